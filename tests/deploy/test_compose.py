"""compose.yaml + overrides: parse and merge with the real docker-compose, fail fast on a missing
secret, run only commands that exist, set only NCP_* keys that are settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import REPO, check_command, setting_env_names

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose binary missing (apt-get install docker-compose; .ci/run installs it)",
)
COMBOS = {
    "rocm": ["compose.yaml"],
    "nvidia": ["compose.yaml", "compose.nvidia.yaml"],
    "cpu": ["compose.yaml", "compose.cpu.yaml"],
    "cpu-dev": ["compose.yaml", "compose.cpu.yaml", "compose.dev.yaml"],
}
# Non-NCP keys the services may set: vendor runtime settings and the Postgres image's own.
VENDOR_ENV = {
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "HIP_FORCE_DEV_KERNARG",
    "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_ALLOC_CONF",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "PYTHONPATH",
    "VIDEO_GID",
    "RENDER_GID",
}
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-1234",
    "NCP_API_TOKEN": "token-abcdef-123456",
    "NCP_INFERENCE_API_KEY": "key-abcdef-123456",
}


def compose(files: list[str], env_file, *args: str) -> subprocess.CompletedProcess:
    cmd = [COMPOSE, "--project-directory", str(REPO), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(REPO / f)]
    # The caller's environment must not satisfy a secret the env file leaves out.
    env = {
        k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("NCP_", "POSTGRES_"))
    }
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compose") / ".env"
    path.write_text(
        "".join(f"{k}={v}\n" for k, v in SECRETS.items()) + "NCP_GPUS=2,3\nVIDEO_GID=44\nRENDER_GID=110\n"
    )
    return path


@pytest.fixture(scope="module")
def configs(env_file) -> dict[str, dict]:
    out = {}
    for name, files in COMBOS.items():
        r = compose(files, env_file, "config")
        assert r.returncode == 0, f"{name}: docker-compose config failed:\n{r.stderr}"
        out[name] = yaml.safe_load(r.stdout)
    return out


def active(cfg: dict) -> dict[str, dict]:
    """Services that `up` starts (not parked in a profile)."""
    return {n: s for n, s in cfg["services"].items() if not s.get("profiles")}


def test_every_combination_has_the_full_platform(configs):
    for name, cfg in configs.items():
        commands = [s.get("command") or [] for s in active(cfg).values()]
        roles = {c[-1] if c[:2] == ["ncp", "worker"] else " ".join(c) for c in commands}
        for queue in ("data", "train", "eval"):
            assert queue in roles, f"{name}: no active worker for queue {queue}"
        assert "ncp reconciler" in roles and "ncp db upgrade" in roles, name
        assert any("services.inference.serve" in r for r in roles), f"{name}: no inference service"
        assert {"postgres", "redis", "api"} <= set(active(cfg)), name


def test_commands_exist_in_the_package(configs):
    for cfg in configs.values():
        for svc in cfg["services"].values():
            if svc.get("command") and svc["command"][0] not in ("redis-server",):
                check_command(svc["command"])


def test_env_keys_are_settings(configs):
    known = setting_env_names()
    for name, cfg in configs.items():
        for sname, svc in cfg["services"].items():
            for key in svc.get("environment", {}):
                if key.startswith("NCP_"):
                    assert key in known, (
                        f"{name}/{sname} sets {key}, which is no field of shared.settings.Settings"
                    )
                else:
                    assert key in VENDOR_ENV, f"{name}/{sname} sets unexpected non-NCP key {key}"


def test_env_values_parse_as_settings(configs, monkeypatch):
    """Each service's NCP_* environment builds a valid Settings (types, placeholders), and every
    value reaches its field unchanged (a value Settings ignored or misread would fail here)."""
    from pathlib import Path

    from shared.settings import Settings

    checked = 0
    for cfg in configs.values():
        for sname, svc in cfg["services"].items():
            # None: a key listed without a value, passed on only when .env sets it.
            env = {
                k: str(v)
                for k, v in svc.get("environment", {}).items()
                if k.startswith("NCP_") and v is not None
            }
            if not env:
                continue
            for k in list(os.environ):
                if k.startswith("NCP_"):
                    monkeypatch.delenv(k)
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            settings = Settings()
            for key, raw in env.items():
                value = getattr(settings, key.removeprefix("NCP_").lower())
                if isinstance(value, bool):
                    same = value == (raw.strip().lower() in ("1", "true", "yes", "on"))
                elif isinstance(value, (int, float)):
                    same = value == float(raw)
                elif isinstance(value, Path):
                    same = value == Path(raw).expanduser().resolve()
                elif isinstance(value, list):
                    same = [str(x) for x in value] == json.loads(raw)
                else:
                    same = str(value) == raw
                assert same, f"{sname}: {key}={raw!r} became {value!r}"
                checked += 1
    assert checked > 20  # the compose files do set settings; none was skipped


def test_missing_secret_fails_fast(tmp_path):
    for missing, message in (
        ("POSTGRES_PASSWORD", "POSTGRES_PASSWORD is not set"),
        ("NCP_API_TOKEN", "NCP_API_TOKEN is not set"),
        ("NCP_INFERENCE_API_KEY", "NCP_INFERENCE_API_KEY is not set"),
    ):
        env_file = tmp_path / f"no-{missing}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items() if k != missing))
        for files in COMBOS.values():
            r = compose(files, env_file, "config")
            assert r.returncode != 0, f"{files} accepted a missing {missing}"
            assert message in r.stderr, r.stderr


def test_env_example_is_complete_and_placeholder(configs, tmp_path):
    example = REPO / ".env.example"
    r = compose(COMBOS["rocm"], example, "config")
    assert r.returncode == 0, r.stderr  # every required variable is in the example...
    values = dict(
        line.split("=", 1) for line in example.read_text().splitlines() if line and not line.startswith("#")
    )
    from shared.settings import PLACEHOLDER_SECRETS

    for secret in SECRETS:  # ...but as a placeholder the services reject
        assert values[secret] in PLACEHOLDER_SECRETS


def test_rocm_train_worker_is_pinned_to_the_gpu(configs):
    svc = configs["rocm"]["services"]["train-worker"]
    assert {d.split(":")[0] for d in svc["devices"]} == {"/dev/kfd", "/dev/dri"}
    assert set(svc["group_add"]) == {"44", "110"}  # numeric, from .env
    assert (svc["environment"]["VIDEO_GID"], svc["environment"]["RENDER_GID"]) == ("44", "110")
    assert svc["environment"].get("HSA_OVERRIDE_GFX_VERSION") is None  # not forced
    assert svc["ipc"] == "host" and svc["shm_size"]
    assert "seccomp=unconfined" in svc["security_opt"] and "SYS_PTRACE" in svc["cap_add"]
    env = svc["environment"]
    assert env["HIP_VISIBLE_DEVICES"] == "2,3" == env["NCP_GPUS"]  # from the env file
    assert env["HIP_FORCE_DEV_KERNARG"] == "1" and env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert svc["image"].startswith("nanochat/train-rocm")


def test_nvidia_override_swaps_in_cuda_services(configs):
    cfg = configs["nvidia"]
    for parked in ("train-worker", "eval-worker", "inference"):
        assert cfg["services"][parked]["profiles"] == ["rocm"]
    svc = cfg["services"]["train-worker-cuda"]
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert svc["environment"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "devices" not in svc and svc["image"].startswith("nanochat/train-cuda")
    inf = cfg["services"]["inference-cuda"]
    assert "inference" in inf["networks"]["default"]["aliases"]  # the API's NCP_INFERENCE_URL host


def test_cpu_override_has_no_gpu_and_serves_natively(configs):
    cfg = configs["cpu"]
    for svc in active(cfg).values():
        assert "devices" not in svc and "deploy" not in svc
    inf = cfg["services"]["inference-cpu"]
    assert inf["environment"]["NCP_INFERENCE_ENGINE"] == "native"
    assert "inference" in inf["networks"]["default"]["aliases"]


def test_state_and_ordering(configs):
    cfg = configs["rocm"]
    svcs = cfg["services"]
    assert "--appendonly" in svcs["redis"]["command"] and "yes" in svcs["redis"]["command"]
    assert svcs["postgres"]["healthcheck"]["test"] and svcs["redis"]["healthcheck"]["test"]
    assert any(v.startswith("pgdata:") for v in svcs["postgres"]["volumes"])
    assert svcs["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svcs["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "start_period" in svcs["inference"]["healthcheck"]
    assert {"pgdata", "redisdata", "ncp-home"} <= set(cfg["volumes"])


def test_shared_volume_at_ncp_home_everywhere_runs_are_touched(configs):
    for name, cfg in configs.items():
        for sname, svc in active(cfg).items():
            home = svc.get("environment", {}).get("NCP_HOME")
            if home is None or sname == "migrate":
                continue
            mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
            assert mounts.get(home) == "ncp-home", f"{name}/{sname}: ncp-home volume not mounted at {home}"


def test_gpu_groups_unset_fail_naming_the_variable(tmp_path):
    """No group names reach group_add: unset, the entry is a placeholder docker cannot resolve, so
    the container stops with "Unable to find group VIDEO_GID_is_not_set..."."""
    env_file = tmp_path / "no-gids.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in SECRETS.items()) + "HSA_OVERRIDE_GFX_VERSION=9.4.2\n"
    )
    r = compose(COMBOS["rocm"], env_file, "config")
    assert r.returncode == 0, r.stderr
    svc = yaml.safe_load(r.stdout)["services"]["train-worker"]
    assert sorted(g.split("_is_not_set")[0] for g in svc["group_add"]) == ["RENDER_GID", "VIDEO_GID"]
    assert all("getent_group_video_render" in g for g in svc["group_add"])
    assert svc["environment"]["HSA_OVERRIDE_GFX_VERSION"] == "9.4.2"  # set in .env: passed on


def test_any_printable_password_reaches_the_services_intact(tmp_path, monkeypatch):
    """Every printable ASCII character in POSTGRES_PASSWORD (from the environment, which compose
    never re-interpolates): postgres gets it as is, and the URL the settings build parses back to it."""
    import string

    from sqlalchemy.engine import make_url

    from shared.settings import Settings

    password = string.printable.strip() + " end"
    env_file = tmp_path / "token-only.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items() if k != "POSTGRES_PASSWORD"))
    cmd = [
        COMPOSE,
        "--project-directory",
        str(REPO),
        "--env-file",
        str(env_file),
        "-f",
        str(REPO / "compose.yaml"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCP_", "POSTGRES_"))}
    r = subprocess.run(
        [*cmd, "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "POSTGRES_PASSWORD": password},
    )
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    unescape = lambda v: v.replace("$$", "$")  # noqa: E731 - `config` prints $ escaped as $$
    assert unescape(services["postgres"]["environment"]["POSTGRES_PASSWORD"]) == password
    api_env = {
        k: unescape(str(v))
        for k, v in services["api"]["environment"].items()
        if k.startswith("NCP_") and v is not None
    }
    for k in [k for k in os.environ if k.startswith("NCP_")]:
        monkeypatch.delenv(k)
    for k, v in api_env.items():
        monkeypatch.setenv(k, v)
    url = make_url(Settings().database_url)
    assert url.password == password and url.host == "postgres"
