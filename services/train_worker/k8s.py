"""Multi-node training on Kubernetes: one Indexed Job + one headless Service per training run.

A train worker cannot span nodes by itself, so for `hardware.nodes > 1` it asks the cluster for
`nodes` pods (one per node, `nproc_per_node` GPUs each). Every pod runs the same torchrun command;
`--node-rank` comes from the Job's completion index and the static rendezvous meets at pod 0 (node
rank 0 hosts it), which the headless Service names `<job>-0.<service>`. All pods mount the checkpoint volume at NCP_HOME,
so the config, progress file, stop file and checkpoints are the same paths the worker already
uses for a single-node child: the worker keeps tailing `progress.jsonl` and writing `STOP`.

The Helm chart's `templates/train-multinode.yaml` renders the same objects from values; a test
checks that both agree. Requests go to the Kubernetes REST API with the pod's service account
(token + CA under /var/run/secrets/kubernetes.io/serviceaccount), so no kubectl or client library
is needed in the image.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.paths import run_paths
from shared.settings import Settings

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ENTRY_MODULE = "services.train_worker.entry"
# A pod's hostname is "<job>-<index>" and must stay a DNS label (63 chars), so job names are capped
# well below that.
_MAX_NAME = 50
_LABEL_ID = re.compile(r"[^a-z0-9-]+")
# GPU process settings the training pods inherit from the worker that launches them (the chart
# sets them on the worker from values gpu.env); docs/deploy.md explains each.
GPU_ENV_KEYS = ("HIP_FORCE_DEV_KERNARG", "HSA_OVERRIDE_GFX_VERSION", "PYTORCH_ALLOC_CONF")
POD_FS_GROUP = 10001  # the images' non-root user; makes the checkpoint volume writable
# How long the rank pods wait for each other (and for pod 0's DNS name) before the run fails.
RDZV_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class MultinodeConfig:
    """Everything the manifests depend on; built from a job spec + settings by `multinode_config`."""

    job_id: str
    nodes: int
    nproc_per_node: int
    image: str
    namespace: str
    home: str  # NCP_HOME inside the pods, where the checkpoint claim is mounted
    config_path: str
    progress_path: str
    stop_path: str
    mode: str = "pretrain"
    gpu_resource: str = "amd.com/gpu"
    checkpoint_claim: str = ""
    config_map: str = ""
    rdzv_port: int = 29500
    shm_size: str = "64Gi"
    env: tuple[tuple[str, str], ...] = ()  # extra container env, e.g. the ROCm settings
    supplemental_groups: tuple[int, ...] = ()  # GIDs owning /dev/kfd, /dev/dri on the nodes

    def __post_init__(self) -> None:
        if not self.job_id or not re.fullmatch(r"[A-Za-z0-9-]+", self.job_id):
            raise ValueError(f"job_id must be letters, digits and '-', got {self.job_id!r}")
        if self.nodes < 2:
            raise ValueError(f"nodes must be >= 2 for a multi-node launch, got {self.nodes}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if not self.image:
            raise ValueError("image is empty: set NCP_K8S_TRAIN_IMAGE (Helm: train.image)")
        if self.mode not in ("pretrain", "sft"):
            raise ValueError(f"mode must be 'pretrain' or 'sft', got {self.mode!r}")
        if not self.gpu_resource or "/" not in self.gpu_resource:
            raise ValueError(
                f"gpu_resource must be an extended resource like amd.com/gpu, got {self.gpu_resource!r}"
            )
        if not 0 < self.rdzv_port < 65536:
            raise ValueError(f"rdzv_port must be in 1..65535, got {self.rdzv_port}")
        for name in ("home", "config_path", "progress_path", "stop_path"):
            if not str(getattr(self, name)).startswith("/"):
                raise ValueError(f"{name} must be an absolute path, got {getattr(self, name)!r}")

    @property
    def job_name(self) -> str:
        return resource_name(self.job_id)

    @property
    def service_name(self) -> str:
        return self.job_name  # one name for both: the pod FQDN is then "<job>-0.<job>"

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.job_name}-0.{self.service_name}:{self.rdzv_port}"


def resource_name(job_id: str) -> str:
    """DNS-1035 label for the Job and Service of `job_id` (lowercase, starts with a letter)."""
    slug = _LABEL_ID.sub("-", job_id.lower()).strip("-")
    return f"ncp-train-{slug}"[:_MAX_NAME].rstrip("-")


def multinode_config(
    job_id: str,
    spec: dict[str, Any],
    settings: Settings,
    *,
    mode: str = "pretrain",
    config_path: str | Path | None = None,
    namespace: str | None = None,
    env: dict[str, str] | None = None,
    supplemental_groups: tuple[int, ...] | None = None,
) -> MultinodeConfig:
    """The launch parameters for `spec` (a JobSpec as JSON). Paths default to the run folder;
    GPU env and device groups default to the launching worker's own (same image, same devices)."""
    if env is None:
        env = {k: os.environ[k] for k in GPU_ENV_KEYS if k in os.environ}
    if supplemental_groups is None:
        supplemental_groups = tuple(g for g in os.getgroups() if g not in (0, os.getgid(), POD_FS_GROUP))
    hw = spec.get("hardware") or {}
    nodes = int(hw.get("nodes", 1))
    nproc = settings.nproc_per_node or int(hw.get("gpus", 1))
    run = run_paths(settings.runs_dir, job_id)
    return MultinodeConfig(
        job_id=job_id,
        nodes=nodes,
        nproc_per_node=nproc,
        image=settings.k8s_train_image,
        namespace=namespace if namespace is not None else settings.k8s_namespace,
        home=str(settings.home),
        config_path=str(config_path or run.root / f"{mode}_config.json"),
        progress_path=str(run.progress_file),
        stop_path=str(run.stop_file),
        mode=mode,
        gpu_resource=settings.k8s_gpu_resource,
        checkpoint_claim=settings.k8s_checkpoint_claim,
        config_map=settings.k8s_config_map,
        rdzv_port=settings.k8s_rdzv_port,
        env=tuple(sorted(env.items())),
        supplemental_groups=tuple(supplemental_groups),
    )


def torchrun_command(cfg: MultinodeConfig) -> list[str]:
    # "$(JOB_COMPLETION_INDEX)" is expanded by the kubelet from the container env declared below.
    # The static rendezvous: the pod of index 0 hosts the store because its node rank is 0. (c10d
    # decides that once, at start, by whether the endpoint's name resolves to the pod itself; pod
    # 0's DNS record can lag its start, and it then waited as a client of a store nobody hosted.)
    # Every agent, pod 0 included, retries connecting until the name resolves, for up to
    # RDZV_TIMEOUT_SECONDS.
    return [
        "torchrun",
        f"--nnodes={cfg.nodes}",
        f"--nproc-per-node={cfg.nproc_per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={cfg.rdzv_endpoint}",
        f"--rdzv-id={cfg.job_id}",
        f"--rdzv-conf=timeout={RDZV_TIMEOUT_SECONDS}",
        "-m", ENTRY_MODULE, cfg.mode,
        "--config", cfg.config_path,
        "--progress", cfg.progress_path,
        "--stop", cfg.stop_path,
    ]  # fmt: skip


def _labels(cfg: MultinodeConfig) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "nanochat-platform",
        "app.kubernetes.io/component": "train-multinode",
        "nanochat.dev/job-id": cfg.job_id.lower()[:63],
    }


def render_multinode_manifests(cfg: MultinodeConfig) -> list[dict[str, Any]]:
    """[headless Service, Indexed Job] for one multi-node training run."""
    labels = _labels(cfg)
    meta = {"name": cfg.job_name, "labels": labels}
    if cfg.namespace:
        meta["namespace"] = cfg.namespace
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": dict(meta),
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": cfg.job_name},
            # Rank pods must resolve pod 0 before any of them is Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": cfg.rdzv_port, "targetPort": cfg.rdzv_port}],
        },
    }
    env: list[dict[str, Any]] = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "NCP_HOME", "value": cfg.home},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *({"name": k, "value": v} for k, v in cfg.env),
    ]
    container: dict[str, Any] = {
        "name": "trainer",
        "image": cfg.image,
        "command": torchrun_command(cfg),
        "env": env,
        "ports": [{"name": "rdzv", "containerPort": cfg.rdzv_port}],
        "resources": {
            "limits": {cfg.gpu_resource: str(cfg.nproc_per_node)},
            "requests": {cfg.gpu_resource: str(cfg.nproc_per_node)},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if cfg.config_map:
        container["envFrom"] = [{"configMapRef": {"name": cfg.config_map}}]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}}
    ]
    if cfg.checkpoint_claim:
        container["volumeMounts"].append({"name": "ncp-home", "mountPath": cfg.home})
        volumes.append({"name": "ncp-home", "persistentVolumeClaim": {"claimName": cfg.checkpoint_claim}})
    security: dict[str, Any] = {"fsGroup": POD_FS_GROUP}
    if cfg.supplemental_groups:
        security["supplementalGroups"] = list(cfg.supplemental_groups)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": dict(meta),
        "spec": {
            "completionMode": "Indexed",
            "completions": cfg.nodes,
            "parallelism": cfg.nodes,
            # No pod retries: a failed rank fails the run and the worker resumes it from the newest
            # checkpoint as a new attempt, like a single-node child.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": cfg.service_name,
                    "restartPolicy": "Never",
                    "securityContext": security,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    return [service, job]


def gpu_capacity(nodes: list[dict[str, Any]], resource: str, per_pod: int) -> int:
    """How many `per_pod`-GPU pods the schedulable nodes can hold at once (allocatable, not free)."""
    pods = 0
    for node in nodes:
        if (node.get("spec") or {}).get("unschedulable"):
            continue
        raw = ((node.get("status") or {}).get("allocatable") or {}).get(resource, "0")
        try:
            gpus = int(str(raw))
        except ValueError:
            continue  # extended resources are integers; anything else is not a GPU count
        pods += gpus // per_pod
    return pods


class KubeClient:
    """The few Kubernetes REST calls the launcher needs, authenticated as the pod's service account."""

    def __init__(self, settings: Settings, *, sa_dir: Path = SA_DIR, timeout: float = 30.0):
        token_file, ca_file = sa_dir / "token", sa_dir / "ca.crt"
        if not token_file.is_file():
            raise FileNotFoundError(
                f"no service-account token at {token_file}: not running in a Kubernetes pod"
            )
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        verify: bool | str = str(ca_file) if ca_file.is_file() else True
        self.namespace = settings.k8s_namespace or _read(sa_dir / "namespace") or "default"
        self.http = httpx.Client(
            base_url=settings.k8s_api_url, headers=headers, verify=verify, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def list_nodes(self) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/nodes")
        _raise(r, "list nodes")
        return r.json().get("items", [])

    def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False if it already exists (a redelivered task launching again)."""
        path = _collection(obj["kind"], self.namespace)
        r = self.http.post(path, json=obj)
        if r.status_code == 409:
            return False
        _raise(r, f"create {obj['kind']} {obj['metadata']['name']}")
        return True

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        r = self.http.get(f"{_collection(kind, self.namespace)}/{name}")
        if r.status_code == 404:
            return None
        _raise(r, f"get {kind} {name}")
        return r.json()

    def get_job(self, name: str) -> dict[str, Any] | None:
        return self.get("Job", name)

    def delete(self, kind: str, name: str) -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"}
        r = self.http.request("DELETE", f"{_collection(kind, self.namespace)}/{name}", json=body)
        if r.status_code == 404:
            return False
        _raise(r, f"delete {kind} {name}")
        return True


def _collection(kind: str, namespace: str) -> str:
    if kind == "Job":
        return f"/apis/batch/v1/namespaces/{namespace}/jobs"
    if kind == "Service":
        return f"/api/v1/namespaces/{namespace}/services"
    raise ValueError(f"kind {kind!r} is not created by the multi-node launcher")


def _raise(r: httpx.Response, what: str) -> None:
    if r.is_success:
        return
    try:
        detail = r.json().get("message", r.text)
    except ValueError:
        detail = r.text
    raise RuntimeError(f"Kubernetes API: {what} failed with HTTP {r.status_code}: {detail}")


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def launch_multinode(
    job_id: str,
    spec: dict[str, Any],
    settings: Settings,
    *,
    mode: str = "pretrain",
    config_path: str | Path | None = None,
    client: KubeClient | None = None,
) -> dict[str, Any]:
    """Create the Service + Indexed Job for a multi-node run, or say why it cannot start.

    Returns {"status": "created" | "exists" | "queued" | "unavailable", "reason": str, ...}.
    "queued": the cluster has too few GPUs for the request (the job should stay queued with
    `reason`); "unavailable": no cluster or no image configured; "exists": already launched.
    """
    if not settings.k8s_train_image:
        return {
            "status": "unavailable",
            "reason": "multi-node training needs NCP_K8S_TRAIN_IMAGE (Kubernetes only)",
        }
    own = client is None
    if client is None:
        try:
            client = KubeClient(settings)
        except FileNotFoundError as e:
            return {"status": "unavailable", "reason": str(e)}
    try:
        cfg = multinode_config(
            job_id, spec, settings, mode=mode, config_path=config_path, namespace=client.namespace
        )
        fits = gpu_capacity(client.list_nodes(), cfg.gpu_resource, cfg.nproc_per_node)
        out = {
            "job_name": cfg.job_name,
            "service": cfg.service_name,
            "namespace": cfg.namespace,
            "nodes": cfg.nodes,
            "nproc_per_node": cfg.nproc_per_node,
            "rdzv_endpoint": cfg.rdzv_endpoint,
        }
        if fits < cfg.nodes:
            reason = (
                f"needs {cfg.nodes} nodes x {cfg.nproc_per_node} {cfg.gpu_resource}; the cluster's "
                f"schedulable nodes can hold {fits} such pod(s)"
            )
            return {"status": "queued", "reason": reason, **out}
        service, job = render_multinode_manifests(cfg)
        if multinode_status(client.get_job(cfg.job_name)) in ("succeeded", "failed"):
            # A finished Job of an earlier attempt (a resume after failure): start a fresh one.
            _delete_and_wait(client, cfg.job_name)
        client.create(service)
        created = client.create(job)
        status = "created" if created else "exists"
        return {"status": status, "reason": f"Job {cfg.job_name} {status}", **out}
    finally:
        if own:
            client.close()


def _delete_and_wait(client: KubeClient, name: str, timeout: float = 120.0) -> None:
    for kind in ("Job", "Service"):
        client.delete(kind, name)
    deadline = time.monotonic() + timeout
    while client.get("Job", name) is not None or client.get("Service", name) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Kubernetes API: Job/Service {name} of an earlier attempt still exists after {timeout:.0f} s"
            )
        time.sleep(2.0)


def multinode_status(job: dict[str, Any] | None) -> str:
    """'missing' | 'running' | 'succeeded' | 'failed' from a Job object."""
    if job is None:
        return "missing"
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if cond.get("status") == "True" and cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    return "running"


def delete_multinode(job_id: str, settings: Settings, *, client: KubeClient | None = None) -> bool:
    """Remove the Job (and its pods) and Service of `job_id`; True if anything was there."""
    own = client is None
    client = client or KubeClient(settings)
    try:
        name = resource_name(job_id)
        return bool(client.delete("Job", name) | client.delete("Service", name))
    finally:
        if own:
            client.close()
