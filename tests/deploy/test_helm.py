"""The Helm chart, rendered by Helm's own Go engine (helm-python-sdk), validated object by object
against the Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict)."""

from __future__ import annotations

import copy

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import REPO, check_command, setting_env_names

CHART = REPO / "helm" / "nanochat-platform"
K8S_VERSION = "1.35.0"
# A password with every character that breaks a URL pasted together by hand.
PASSWORD = "p@ss/w:rd+ %#?&=x"
GPU_GROUPS = {"gpu": {"supplementalGroups": [44, 110]}}
REQUIRED = {
    "secrets": {"apiToken": "tok-0123456789", "inferenceApiKey": "key-0123456789"},
    "postgresql": {"password": PASSWORD},
    **GPU_GROUPS,
}


def render(
    values: dict | None = None,
    *,
    overlay: str | None = None,
    namespace: str = "ml",
    upgrade: bool = False,
) -> list[dict]:
    vals = copy.deepcopy(REQUIRED) if values is None else values
    if overlay:  # the overlay file comes last, as with `-f values-nvidia.yaml`
        vals = merge(vals, yaml.safe_load((CHART / overlay).read_text()))
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(vals, name="ncp", namespace=namespace, is_install=not upgrade, is_upgrade=upgrade)
    objs = []
    for name, text in sorted(out.items()):
        if name.endswith(".txt"):
            continue
        objs += [d for d in yaml.safe_load_all(text) if d]
    return objs


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def containers(objs: list[dict]):
    for o in objs:
        spec = o.get("spec", {})
        pod = spec.get("template", {}).get("spec")
        if pod:
            yield o, pod, pod["containers"]


VARIANTS = {
    "default": lambda: render(),
    "nvidia": lambda: render(overlay="values-nvidia.yaml"),
    "external": lambda: render(
        merge(
            REQUIRED,
            {
                "postgresql": {"enabled": False},
                "redis": {"enabled": False},
                "externalDatabase": {"url": "postgresql+psycopg://u:p@db.example:5432/ncp"},
                "externalRedis": {"url": "redis://cache.example:6379/0"},
                "persistence": {"existingClaim": "shared-home"},
            },
        )
    ),
    "multinode": lambda: render(merge(REQUIRED, {"multinode": {"enabled": True, "jobId": "abc-123"}})),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: make() for name, make in VARIANTS.items()}


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    for variant, objs in rendered.items():
        assert objs, variant
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(
                    f"{variant}: {obj['kind']}/{obj['metadata']['name']}: {e.message}"
                ) from e


def test_schema_validation_rejects_a_broken_object(rendered):
    """The validator is not a rubber stamp: a misspelled field of a rendered Deployment fails."""
    dep = copy.deepcopy(next(iter(by_kind(rendered["default"], "Deployment").values())))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_helm_lint_is_clean():
    report = helm.lint(str(CHART), copy.deepcopy(REQUIRED), strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2]
    assert not errors and not report["errors"], report


@pytest.mark.parametrize(
    "values, message",
    [
        ({"postgresql": {"password": "x"}, **GPU_GROUPS}, "secrets.apiToken is required"),
        (
            {"secrets": {"apiToken": "t"}, "postgresql": {"password": "x"}, **GPU_GROUPS},
            "secrets.inferenceApiKey is required",
        ),
        (
            {"secrets": {"apiToken": "t", "inferenceApiKey": "k"}, **GPU_GROUPS},
            "postgresql.password is required",
        ),
        (
            {
                "secrets": {"apiToken": "t", "inferenceApiKey": "k"},
                "postgresql": {"enabled": False},
                **GPU_GROUPS,
            },
            "externalDatabase.url is required",
        ),
        (
            {"secrets": {"apiToken": "t", "inferenceApiKey": "k"}, "postgresql": {"password": "x"}},
            "gpu.supplementalGroups is required with gpu.resource=amd.com/gpu",
        ),
        (merge(REQUIRED, {"gpu": {"supplementalGroups": ["video", 110]}}), '"video" is not a number'),
        (merge(REQUIRED, {"gpu": {"supplementalGroups": ["44"]}}), '"44" is not a number'),
        (merge(REQUIRED, {"redis": {"enabled": False}}), "externalRedis.url is required"),
        (merge(REQUIRED, {"multinode": {"enabled": True}}), "multinode.jobId is required"),
    ],
)
def test_missing_required_value_fails(values, message):
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert message in str(e.value)


def test_the_platform_is_all_there(rendered):
    objs = rendered["default"]
    deps = by_kind(objs, "Deployment")
    commands = {tuple(p["containers"][0].get("command", ())) for _, p, _ in containers(objs)}
    for queue in ("data", "train", "eval"):
        assert ("ncp", "worker", "--queues", queue) in commands
    assert ("ncp", "reconciler") in commands and ("ncp", "db", "upgrade") in commands
    assert ("python3", "-m", "services.inference.serve") in commands
    assert len(deps) == 6
    assert set(by_kind(objs, "StatefulSet")) == {
        "ncp-nanochat-platform-postgres",
        "ncp-nanochat-platform-redis",
    }
    (pvc,) = by_kind(objs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    ext = rendered["external"]
    assert not by_kind(ext, "StatefulSet") and not by_kind(ext, "PersistentVolumeClaim")
    secret = by_kind(ext, "Secret")["ncp-nanochat-platform-secrets"]["stringData"]
    assert secret["NCP_DATABASE_URL"] == "postgresql+psycopg://u:p@db.example:5432/ncp"
    assert secret["NCP_BROKER_URL"] == "redis://cache.example:6379/0"


def test_database_url_is_built_from_fields_by_the_settings(rendered, monkeypatch):
    """The chart passes host/user/name/password apart; shared/settings.py builds and quotes the URL
    (the one place, for compose too), so the password survives every URL character."""
    from sqlalchemy.engine import make_url

    from shared.settings import Settings

    objs = rendered["default"]
    cm = by_kind(objs, "ConfigMap")["ncp-nanochat-platform-config"]["data"]
    secret = by_kind(objs, "Secret")["ncp-nanochat-platform-secrets"]["stringData"]
    assert "NCP_DATABASE_URL" not in secret and secret["NCP_DB_PASSWORD"] == PASSWORD
    for k in [k for k in __import__("os").environ if k.startswith("NCP_")]:
        monkeypatch.delenv(k)
    for k, v in {**cm, **secret}.items():
        monkeypatch.setenv(k, v)
    url = make_url(Settings().database_url)
    assert url.password == PASSWORD and url.host == "ncp-nanochat-platform-postgres"
    assert (url.username, url.database, url.port) == ("ncp", "ncp", 5432)


def test_commands_exist_in_the_package(rendered):
    for objs in rendered.values():
        for _, _, ctrs in containers(objs):
            for c in ctrs:
                if "command" in c:  # Postgres runs its image's own entrypoint
                    check_command(c["command"])


def test_configmap_and_env_keys_are_settings(rendered):
    known = setting_env_names()
    for variant, objs in rendered.items():
        for cm in by_kind(objs, "ConfigMap").values():
            unknown = set(cm["data"]) - known
            assert not unknown, f"{variant}: ConfigMap keys that are no Settings field: {unknown}"
        for secret in by_kind(objs, "Secret").values():
            keys = set(secret.get("stringData", {}))
            if keys != {"POSTGRES_PASSWORD"}:
                assert keys <= known, f"{variant}: Secret {secret['metadata']['name']} keys {keys - known}"
        for _, _, ctrs in containers(objs):
            for c in ctrs:
                for e in c.get("env", []):
                    if e["name"].startswith("NCP_"):
                        assert e["name"] in known, f"{variant}: env {e['name']} is no Settings field"


def test_configmap_values_build_settings(rendered, monkeypatch):
    from shared.settings import Settings

    cm = by_kind(rendered["default"], "ConfigMap")["ncp-nanochat-platform-config"]["data"]
    secret = by_kind(rendered["default"], "Secret")["ncp-nanochat-platform-secrets"]["stringData"]
    for k, v in {**cm, **secret}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.k8s_gpu_resource == "amd.com/gpu" and s.k8s_namespace == "ml"
    assert (
        s.k8s_train_image == "nanochat/train-rocm:0.1.0"
        and s.k8s_checkpoint_claim == "ncp-nanochat-platform-home"
    )


def test_gpu_workloads_request_the_vendor_resource(rendered):
    for variant, resource in (("default", "amd.com/gpu"), ("nvidia", "nvidia.com/gpu")):
        deps = by_kind(rendered[variant], "Deployment")
        for name in ("train-worker", "eval-worker", "inference"):
            pod = deps[f"ncp-nanochat-platform-{name}"]["spec"]["template"]["spec"]
            assert pod["containers"][0]["resources"]["limits"][resource] == "1", (variant, name)
        data = deps["ncp-nanochat-platform-data-worker"]["spec"]["template"]["spec"]["containers"][0]
        assert "limits" not in data["resources"]
        train = deps["ncp-nanochat-platform-train-worker"]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in train["env"]}
        assert ("HIP_FORCE_DEV_KERNARG" in env) == (variant == "default")
        assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
        assert train["image"] == f"nanochat/train-{'rocm' if variant == 'default' else 'cuda'}:0.1.0"


def test_rbac_lets_only_the_train_worker_launch_jobs(rendered):
    objs = rendered["default"]
    (role,) = by_kind(objs, "Role").values()
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "delete", "get"} <= verbs[("batch", "jobs")] and "create" in verbs[("", "services")]
    (crole,) = by_kind(objs, "ClusterRole").values()
    assert crole["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]
    sa = next(iter(by_kind(objs, "ServiceAccount")))
    for name, dep in by_kind(objs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        if name.endswith("train-worker"):
            assert pod["serviceAccountName"] == sa
        else:
            assert "serviceAccountName" not in pod


def test_migrations_never_deadlock_helm_install_wait(rendered):
    """`helm install --wait/--atomic` with the bundled Postgres: the migration is an ordinary Job of
    the release (a post-install hook would only start after --wait saw the API ready, which needs
    the tables). Upgrades and external databases migrate in a pre-* hook, before the new code."""
    install = rendered["default"]
    job = by_kind(install, "Job")["ncp-nanochat-platform-migrate-install"]
    secret = by_kind(install, "Secret")["ncp-nanochat-platform-migrate-install"]
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
    assert "helm.sh/hook" not in secret["metadata"].get("annotations", {})
    assert job["spec"]["backoffLimit"] >= 6  # retried until the bundled Postgres answers
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "ncp-nanochat-platform-migrate-install"}}
    ]
    assert secret["stringData"]["NCP_DB_PASSWORD"] == PASSWORD
    assert not any(
        "post-install" in o["metadata"].get("annotations", {}).get("helm.sh/hook", "") for o in install
    )
    # The API's readiness needs the tables; what makes it ready is this Job, not a later hook.
    api = by_kind(install, "Deployment")["ncp-nanochat-platform-api"]["spec"]["template"]["spec"]
    assert api["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Inference is ready before any model is published ("no model yet"), so --wait finishes.
    inf = by_kind(install, "Deployment")["ncp-nanochat-platform-inference"]["spec"]["template"]["spec"]
    assert inf["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
    for variant, objs, phase in (
        ("upgrade", render(upgrade=True), "pre-upgrade"),
        ("external", rendered["external"], "pre-install,pre-upgrade"),
    ):
        job = by_kind(objs, "Job")["ncp-nanochat-platform-migrate"]
        secret = by_kind(objs, "Secret")["ncp-nanochat-platform-migrate"]
        assert job["metadata"]["annotations"]["helm.sh/hook"] == phase, variant
        assert secret["metadata"]["annotations"]["helm.sh/hook"] == phase, variant
        assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
            job["metadata"]["annotations"]["helm.sh/hook-weight"]
        )


def test_gpu_overrides_only_where_set(rendered):
    """HSA_OVERRIDE_GFX_VERSION is per GPU part: never forced, passed on when a user sets it."""
    for variant in ("default", "nvidia"):
        for _, _, ctrs in containers(rendered[variant]):
            assert "HSA_OVERRIDE_GFX_VERSION" not in {e["name"] for e in ctrs[0].get("env", [])}
    objs = render(merge(REQUIRED, {"gpu": {"env": {"HSA_OVERRIDE_GFX_VERSION": "9.4.2"}}}))
    train = by_kind(objs, "Deployment")["ncp-nanochat-platform-train-worker"]["spec"]["template"]["spec"]
    assert {"name": "HSA_OVERRIDE_GFX_VERSION", "value": "9.4.2"} in train["containers"][0]["env"]


def test_nfs_home_permissions_init_container(rendered):
    api = by_kind(rendered["default"], "Deployment")["ncp-nanochat-platform-api"]["spec"]["template"]["spec"]
    assert "initContainers" not in api
    objs = render(merge(REQUIRED, {"persistence": {"initPermissions": True}}))
    api = by_kind(objs, "Deployment")["ncp-nanochat-platform-api"]["spec"]["template"]["spec"]
    (init,) = api["initContainers"]
    assert init["securityContext"] == {"runAsUser": 0, "runAsNonRoot": False}
    env = {e["name"]: e["value"] for e in init["env"]}
    assert (env["NCP_UID"], env["NCP_GID"], env["NCP_HOME"]) == ("10001", "10001", "/data/ncp")
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/data/ncp"}


def test_checkpoint_volume_is_mounted_at_ncp_home(rendered):
    for variant in ("default", "external"):
        objs = rendered[variant]
        home = by_kind(objs, "ConfigMap")["ncp-nanochat-platform-config"]["data"]["NCP_HOME"]
        claim = "shared-home" if variant == "external" else "ncp-nanochat-platform-home"
        for o, pod, ctrs in containers(objs):
            if o["kind"] == "StatefulSet" or "-migrate" in o["metadata"]["name"]:
                continue
            vols = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in ctrs[0]["volumeMounts"]}
            assert vols[mounts[home]]["persistentVolumeClaim"]["claimName"] == claim, o["metadata"]["name"]
