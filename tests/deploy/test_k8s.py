"""services/train_worker/k8s.py: multi-node manifests (schema-valid, torchrun args, same as the
chart's template), the GPU capacity check, and the REST calls against a local HTTP server that
speaks the few Kubernetes API paths the launcher uses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest

from services.train_worker import k8s
from shared.settings import Settings
from tests.deploy.test_helm import REQUIRED, merge, render

SPEC = {"kind": "pretrain", "hardware": {"gpus": 8, "nodes": 4, "device": "auto"}}


def make_cfg(**kw) -> k8s.MultinodeConfig:
    base = dict(
        job_id="Job-42",
        nodes=4,
        nproc_per_node=8,
        image="reg/train-rocm:1",
        namespace="ml",
        home="/data/ncp",
        config_path="/data/ncp/runs/Job-42/pretrain_config.json",
        progress_path="/data/ncp/runs/Job-42/progress.jsonl",
        stop_path="/data/ncp/runs/Job-42/STOP",
        checkpoint_claim="home-pvc",
        config_map="ncp-config",
    )
    return k8s.MultinodeConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "field, value",
    [
        ("job_id", "bad id!"),
        ("nodes", 1),
        ("nproc_per_node", 0),
        ("image", ""),
        ("mode", "eval"),
        ("gpu_resource", "gpu"),
        ("rdzv_port", 0),
        ("config_path", "relative.json"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        make_cfg(**{field: value})


def test_names_are_dns_labels():
    assert k8s.resource_name("Job-42") == "ncp-train-job-42"
    assert k8s.resource_name("A_b.C") == "ncp-train-a-b-c"
    long = k8s.resource_name("x" * 100 + "-y")
    assert len(long) <= 50 and not long.endswith("-")
    cut_at_hyphen = "a" * 39 + "--bcd"
    assert k8s.resource_name(cut_at_hyphen) == "ncp-train-" + "a" * 39
    for job_id in (cut_at_hyphen, "A_b.C", "x" * 100):  # the chart's helper names them the same way
        objs = render(merge(REQUIRED, {"multinode": {"enabled": True, "jobId": job_id}}))
        assert {o["metadata"]["name"] for o in objs if o["kind"] == "Job"} >= {k8s.resource_name(job_id)}


def test_manifests_validate_and_carry_the_torchrun_args():
    service, job = k8s.render_multinode_manifests(
        make_cfg(env=(("HIP_FORCE_DEV_KERNARG", "1"),), supplemental_groups=(44, 110))
    )
    for obj in (service, job):
        kubernetes_validate.validate(obj, "1.35.0", strict=True)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "ncp-train-job-42"
    (c,) = pod["containers"]
    cmd = c["command"]
    assert cmd[0] == "torchrun"
    assert "--nnodes=4" in cmd and "--nproc-per-node=8" in cmd
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    # static: node rank 0 hosts the rendezvous whether or not its DNS name resolves yet at start
    assert (
        "--rdzv-backend=static" in cmd and "--rdzv-endpoint=ncp-train-job-42-0.ncp-train-job-42:29500" in cmd
    )
    i = cmd.index("-m")
    assert cmd[i + 1 : i + 3] == ["services.train_worker.entry", "pretrain"]
    assert cmd[cmd.index("--config") + 1].endswith("pretrain_config.json")
    assert cmd[cmd.index("--progress") + 1] == "/data/ncp/runs/Job-42/progress.jsonl"
    assert cmd[cmd.index("--stop") + 1] == "/data/ncp/runs/Job-42/STOP"
    env = {e["name"]: e for e in c["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["HIP_FORCE_DEV_KERNARG"]["value"] == "1"
    assert c["resources"]["limits"] == {"amd.com/gpu": "8"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/data/ncp"]]["persistentVolumeClaim"]["claimName"] == "home-pvc"
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["supplementalGroups"] == [44, 110]


def test_torchrun_args_parse_with_torchrun_itself():
    """The argument list is one torch.distributed.run accepts (node rank substituted by the kubelet)."""
    torchrun = pytest.importorskip("torch.distributed.run")
    cmd = [a.replace("$(JOB_COMPLETION_INDEX)", "2") for a in k8s.torchrun_command(make_cfg())]
    args = torchrun.get_args_parser().parse_args(cmd[1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 2)
    assert args.rdzv_conf == "timeout=900"
    assert (args.rdzv_backend, args.rdzv_endpoint, args.module) == (
        "static",
        "ncp-train-job-42-0.ncp-train-job-42:29500",
        True,
    )
    assert (
        args.training_script == "services.train_worker.entry" and args.training_script_args[0] == "pretrain"
    )


def test_chart_template_renders_the_same_objects():
    """helm/nanochat-platform/templates/train-multinode.yaml and k8s.py agree field for field."""
    objs = render(
        merge(REQUIRED, {"multinode": {"enabled": True, "jobId": "Job-42", "nodes": 4, "nprocPerNode": 8}})
    )
    chart = {o["kind"]: o for o in objs if o["metadata"]["name"] == "ncp-train-job-42"}
    cfg = make_cfg(
        image="nanochat/train-rocm:0.1.0",
        checkpoint_claim="ncp-nanochat-platform-home",
        config_map="ncp-nanochat-platform-config",
        env=(
            ("HIP_FORCE_DEV_KERNARG", "1"),
            ("PYTORCH_ALLOC_CONF", "expandable_segments:True"),
        ),
        supplemental_groups=(44, 110),
    )
    service, job = k8s.render_multinode_manifests(cfg)
    assert chart["Service"] == service
    assert chart["Job"] == job


def test_multinode_config_from_spec_and_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("NCP_HOME", str(tmp_path))
    monkeypatch.setenv("HIP_FORCE_DEV_KERNARG", "1")
    s = Settings(k8s_train_image="img:1", k8s_gpu_resource="nvidia.com/gpu", k8s_checkpoint_claim="pvc")
    cfg = k8s.multinode_config("j1", SPEC, s, mode="sft", namespace="ns")
    assert (cfg.nodes, cfg.nproc_per_node, cfg.mode, cfg.gpu_resource) == (4, 8, "sft", "nvidia.com/gpu")
    assert cfg.progress_path == str(tmp_path / "runs" / "j1" / "progress.jsonl")
    assert cfg.config_path == str(tmp_path / "runs" / "j1" / "sft_config.json")
    assert ("HIP_FORCE_DEV_KERNARG", "1") in cfg.env
    assert (
        k8s.multinode_config("j1", SPEC, Settings(k8s_train_image="i", nproc_per_node=2)).nproc_per_node == 2
    )


def node(gpus: str | int, resource: str = "amd.com/gpu", unschedulable: bool = False) -> dict:
    return {
        "metadata": {"name": "n"},
        "spec": {"unschedulable": unschedulable},
        "status": {"allocatable": {"cpu": "96", resource: str(gpus)}},
    }


def test_gpu_capacity_counts_whole_pods_on_schedulable_nodes():
    nodes = [
        node(8),
        node(8),
        node(4),
        node(16),
        node(8, unschedulable=True),
        node(8, "nvidia.com/gpu"),
        node("x"),
    ]
    assert k8s.gpu_capacity(nodes, "amd.com/gpu", 8) == 1 + 1 + 0 + 2
    assert k8s.gpu_capacity(nodes, "amd.com/gpu", 4) == 2 + 2 + 1 + 4
    assert k8s.gpu_capacity(nodes, "nvidia.com/gpu", 8) == 1
    assert k8s.gpu_capacity([], "amd.com/gpu", 1) == 0


class FakeApi:
    """A local HTTP server answering the launcher's Kubernetes paths and recording every request."""

    def __init__(self, nodes: list[dict]):
        self.nodes, self.objects, self.requests = nodes, {}, []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else {}

            def do_GET(self):
                api.requests.append(("GET", self.path, self.headers.get("Authorization"), None))
                if self.path == "/api/v1/nodes":
                    return self._send(200, {"kind": "NodeList", "items": api.nodes})
                obj = api.objects.get(self.path)
                return self._send(200, obj) if obj else self._send(404, {"message": "not found"})

            def do_POST(self):
                body = self._body()
                api.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
                key = f"{self.path}/{body['metadata']['name']}"
                if key in api.objects:
                    return self._send(409, {"message": "already exists"})
                api.objects[key] = body
                return self._send(201, body)

            def do_DELETE(self):
                api.requests.append(("DELETE", self.path, self.headers.get("Authorization"), self._body()))
                if api.objects.pop(self.path, None) is None:
                    return self._send(404, {"message": "not found"})
                return self._send(200, {"status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sa_dir(tmp_path):
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text("sa-token-xyz\n")
    (d / "namespace").write_text("train-ns\n")
    return d


def settings_for(api: FakeApi, tmp_path, **kw) -> Settings:
    return Settings(
        home=tmp_path / "home",
        k8s_api_url=api.url,
        k8s_train_image="reg/train:1",
        k8s_checkpoint_claim="home-pvc",
        **kw,
    )


def test_launch_creates_service_and_job_once(tmp_path, sa_dir):
    with FakeApi([node(8)] * 4) as api:
        s = settings_for(api, tmp_path)
        client = k8s.KubeClient(s, sa_dir=sa_dir)
        out = k8s.launch_multinode("Job-42", SPEC, s, client=client)
        assert out["status"] == "created" and out["namespace"] == "train-ns"
        assert out["rdzv_endpoint"] == "ncp-train-job-42-0.ncp-train-job-42:29500"
        posts = [r for r in api.requests if r[0] == "POST"]
        assert [p[1] for p in posts] == [
            "/api/v1/namespaces/train-ns/services",
            "/apis/batch/v1/namespaces/train-ns/jobs",
        ]
        assert all(r[2] == "Bearer sa-token-xyz" for r in api.requests)
        for _, _, _, body in posts:
            kubernetes_validate.validate(body, "1.35.0", strict=True)
            assert body["metadata"]["namespace"] == "train-ns"
        # A redelivered task launching again finds the Job and creates nothing new.
        again = k8s.launch_multinode("Job-42", SPEC, s, client=client)
        assert again["status"] == "exists"
        job = client.get_job("ncp-train-job-42")
        assert k8s.multinode_status(job) == "running"
        assert k8s.delete_multinode("Job-42", s, client=client) is True
        assert k8s.multinode_status(client.get_job("ncp-train-job-42")) == "missing"
        assert k8s.delete_multinode("Job-42", s, client=client) is False
        client.close()


def test_a_finished_job_of_an_earlier_attempt_is_replaced(tmp_path, sa_dir):
    with FakeApi([node(8)] * 4) as api:
        s = settings_for(api, tmp_path)
        client = k8s.KubeClient(s, sa_dir=sa_dir)
        assert k8s.launch_multinode("Job-9", SPEC, s, client=client)["status"] == "created"
        path = "/apis/batch/v1/namespaces/train-ns/jobs/ncp-train-job-9"
        api.objects[path]["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
        out = k8s.launch_multinode("Job-9", SPEC, s, client=client)
        assert out["status"] == "created"  # not "exists": the failed Job was deleted and recreated
        assert k8s.multinode_status(client.get_job("ncp-train-job-9")) == "running"
        deletes = [r[1] for r in api.requests if r[0] == "DELETE"]
        assert deletes == [path, "/api/v1/namespaces/train-ns/services/ncp-train-job-9"]
        client.close()


def test_too_few_gpus_stays_queued_with_a_reason(tmp_path, sa_dir):
    with FakeApi([node(8), node(8), node(4)]) as api:
        s = settings_for(api, tmp_path)
        client = k8s.KubeClient(s, sa_dir=sa_dir)
        out = k8s.launch_multinode("Job-7", SPEC, s, client=client)
        client.close()
    assert out["status"] == "queued"
    assert "needs 4 nodes x 8 amd.com/gpu" in out["reason"] and "hold 2" in out["reason"]
    assert not [r for r in api.requests if r[0] == "POST"]  # nothing was created


def test_api_errors_are_reported_with_the_server_message(tmp_path, sa_dir):
    with FakeApi([node(8)] * 4) as api:
        s = settings_for(api, tmp_path, k8s_namespace="forbidden")
        client = k8s.KubeClient(s, sa_dir=sa_dir)
        api.server.RequestHandlerClass.do_POST = lambda self: self._send(
            403, {"message": "jobs is forbidden"}
        )
        with pytest.raises(RuntimeError, match=r"HTTP 403: jobs is forbidden"):
            k8s.launch_multinode("Job-1", SPEC, s, client=client)
        client.close()


def test_unavailable_outside_a_cluster_or_without_an_image(tmp_path):
    out = k8s.launch_multinode("j", SPEC, Settings(home=tmp_path))
    assert out["status"] == "unavailable" and "NCP_K8S_TRAIN_IMAGE" in out["reason"]
    with pytest.raises(FileNotFoundError, match="service-account token"):
        k8s.KubeClient(Settings(home=tmp_path, k8s_train_image="i"), sa_dir=tmp_path / "none")


def test_job_status_from_conditions():
    assert (
        k8s.multinode_status({"status": {"conditions": [{"type": "Complete", "status": "True"}]}})
        == "succeeded"
    )
    assert (
        k8s.multinode_status({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "failed"
    )
    assert k8s.multinode_status({"status": {"active": 4}}) == "running"
