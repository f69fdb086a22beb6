"""What scripts/e2e_compose.sh checks once `docker compose up --wait` has the CPU stack healthy.

Everything goes through what a user has: the published API port with the bearer token from .env,
the inference port, and the docker CLI (kill, restart, run). Each check appends one line
"name<TAB>PASS|FAIL<TAB>detail" to --checks; the first failure stops the scenario (exit 1).

1. the API answers /readyz, refuses a request without the token, accepts the token from .env;
2. a tiny pipeline job (demo corpus, 40 pretraining steps, a checkpoint every 8) is submitted;
   mid-pretraining the train worker's container is killed (`docker kill`) and started again: the
   job resumes from the newest checkpoint with every step recorded once;
3. later in the run the postgres and redis containers are restarted: the job still succeeds;
4. the published model answers /v1/chat/completions on the inference port with the key from .env
   (401 without it), and through the API's /v1 relay with the API token alone;
5. the train worker's start check, in the worker image: a GPU device node it cannot open and a
   non-numeric GID stop it with the fix named; the host GID (numeric group_add) lets it through;
6. the HumanEval sandbox's escapes fail inside the eval worker container (compose's settings) and in
   the same image under the chart's eval pod security context, mapped to docker flags;
7. the Helm chart's multi-node pod command as two containers on a private network, pod 0's own
   name resolving only after both have started: the rendezvous meets and training finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]
LABEL = "ncp-e2e"  # on every container/volume/network this script creates: cleanup finds them


class CheckFailed(Exception):
    recorded = False  # True once its FAIL line is in the checks file


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.checks = Path(args.checks)
        self.env = read_env(Path(args.env_file))
        self.token = self.env["NCP_API_TOKEN"]
        self.api = httpx.Client(
            base_url=args.api, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        with self.checks.open("a") as f:
            f.write(f"{name}\t{'PASS' if ok else 'FAIL'}\t{detail}\n")
        print(f"[scenario] {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            err = CheckFailed(f"{name}: {detail}")
            err.recorded = True
            raise err

    def container(self, service: str) -> str:
        out = docker(
            "ps", "-q", "--filter", f"label=com.docker.compose.project={self.args.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        ids = out.split()
        if len(ids) != 1:
            raise CheckFailed(f"expected one running container of {service}, found {ids}")
        return ids[0]

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.api.get(f"/jobs/{job_id}")
        r.raise_for_status()
        return r.json()


def read_env(path: Path) -> dict[str, str]:
    """The e2e .env (KEY=value or KEY='literal value' lines), as compose reads it."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value.startswith("'") else value
    return out


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)} failed: {r.stderr.strip()[-800:]}")
    return r.stdout


def wait_for(cond, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- 1. API and token --------------------------------------------------------------------------------
def check_api(run: Run) -> None:
    ready = httpx.get(f"{run.args.api}/readyz", timeout=30)
    run.record("API /readyz through the published port", ready.status_code == 200, ready.text[:120])
    anon = httpx.get(f"{run.args.api}/jobs", timeout=30)
    authed = run.api.get("/jobs")
    run.record(
        "bearer token from .env (`@ / : + space`) required and accepted",
        anon.status_code == 401 and authed.status_code == 200,
        f"without: {anon.status_code}, with: {authed.status_code}",
    )


# --- 2./3. the job, a killed worker, restarted databases --------------------------------------------
SPEC: dict[str, Any] = {
    "kind": "pipeline",
    "name": "e2e compose",
    "model": {"depth": 2, "aspect_ratio": 64, "head_dim": 64, "window_pattern": "L", "sequence_len": 256, "vocab_size": 1024},
    "data": {"source": "demo", "num_shards": 4},
    "tokenizer": {"vocab_size": 1024, "max_chars": 2_000_000},
    "horizon": {"num_iterations": 40},
    "hardware": {"gpus": 0, "nodes": 1, "device": "cpu"},
    "batch": {"device_batch_size": 4, "total_batch_size": 1024},
    "optim": {"warmup_steps": 4},
    "eval": {"every": 20, "tokens": 4096, "core_max_per_task": 8, "chat_max_per_task": 8},
    "checkpoint": {"every": 8, "keep_last": 10},
    "sft": {"num_iterations": 10, "device_batch_size": 4, "sources": [{"kind": "demo"}]},
    "seed": 42,
}  # fmt: skip
KILL_AFTER_CHECKPOINT = 16


def run_job(run: Run) -> str:
    r = run.api.post("/jobs", json=SPEC, headers={"Idempotency-Key": f"e2e-{os.getpid()}"})
    job_id = r.json().get("id") if r.status_code == 202 else None
    run.record(
        "POST /jobs (tiny pipeline)", job_id is not None, f"HTTP {r.status_code} job {job_id or r.text[:200]}"
    )
    t0 = time.monotonic()

    def checkpointed() -> dict | None:
        job = run.job(job_id)
        if job["status"] in ("failed", "cancelled"):
            raise CheckFailed(f"job {job['status']} before the kill: {job.get('error')}")
        ckpt = job.get("latest_checkpoint") or {}
        return (
            job if ckpt.get("stage") == "pretrain" and ckpt.get("step", 0) >= KILL_AFTER_CHECKPOINT else None
        )

    job = wait_for(
        checkpointed, run.args.timeout, f"a pretraining checkpoint at step >= {KILL_AFTER_CHECKPOINT}"
    )
    worker = run.container("train-worker-cpu")
    docker("kill", worker)
    killed_at = job["progress"].get("step")
    # docker kill is a manual stop (no restart policy applies): start it as an operator would.
    time.sleep(2)
    docker("start", worker)
    run.record(
        "train worker killed mid-pretraining, container started again",
        True,
        f"killed near step {killed_at}, newest checkpoint step {job['latest_checkpoint']['step']}",
    )

    def past_pretrain() -> dict | None:
        job = run.job(job_id)
        if job["status"] in ("failed", "cancelled"):
            raise CheckFailed(f"job {job['status']} after the kill: {job.get('error')}")
        stages = {s["name"]: s for s in job["stages"]}
        return job if stages["pretrain"]["status"] == "succeeded" else None

    job = wait_for(past_pretrain, run.args.timeout, "pretraining to finish after the kill")
    check_resume(run, job_id, job)

    # Postgres and Redis restarted while the rest of the pipeline runs.
    for service in ("postgres", "redis"):
        docker("restart", run.container(service))
    run.record(
        "postgres and redis containers restarted mid-run", True, f"during stage {job['current_stage']}"
    )

    def finished() -> dict | None:
        try:
            job = run.job(job_id)
        except httpx.HTTPError:
            return None  # the API may answer 5xx for a moment while postgres comes back
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, run.args.timeout, "the job to finish", interval=3)
    run.record(
        "job followed to succeeded",
        job["status"] == "succeeded",
        f"{job['status']} after {time.monotonic() - t0:.0f} s, attempts {job['attempts']}, error {job.get('error')}",
    )
    return job_id


def check_resume(run: Run, job_id: str, job: dict) -> None:
    pre = next(s for s in job["stages"] if s["name"] == "pretrain")
    outputs = pre.get("outputs") or {}
    resumed = outputs.get("resumed_from")
    events = run.api.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    types = {e["type"] for e in events}
    ckpts = sorted(
        c["step"] for c in run.api.get(f"/jobs/{job_id}/checkpoints").json()["data"] if c["kind"] == "base"
    )
    series = run.api.get(f"/jobs/{job_id}/metrics").json()["series"]
    pretrain_steps = {
        name: [p["step"] for p in points if p["stage"] == "pretrain"] for name, points in series.items()
    }
    dupes = {n: s for n, s in pretrain_steps.items() if len(s) != len(set(s))}
    loss = next((s for n, s in pretrain_steps.items() if "loss" in n and s), [])
    ok = (
        resumed is not None
        and resumed >= KILL_AFTER_CHECKPOINT
        and outputs.get("step") == 40
        and {"retry", "resume"} <= types
        and ckpts == [8, 16, 24, 32, 40]
        and not dupes
        and sorted(loss) == list(range(1, 41))
    )
    run.record(
        "resumed from checkpoint, no step twice",
        ok,
        f"resumed_from {resumed}, final step {outputs.get('step')}, checkpoints {ckpts}, "
        f"events retry/resume {sorted({'retry', 'resume'} & types)}, duplicated metric steps {dupes or 'none'}",
    )


# --- 4. chat ---------------------------------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 16}


def _answer(r: httpx.Response) -> str | None:
    body = r.json() if r.status_code == 200 else {}
    return ((body.get("choices") or [{}])[0].get("message") or {}).get("content")


def check_chat(run: Run) -> None:
    served = run.api.get("/models/served").json()
    model = (served.get("current") or {}).get("model")
    if not model:
        raise CheckFailed(f"no model published: {served}")
    key = {"Authorization": f"Bearer {run.env['NCP_INFERENCE_API_KEY']}"}

    def serving() -> bool:
        try:
            r = httpx.get(f"{run.args.inference}/v1/models", headers=key, timeout=5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and model in [m["id"] for m in r.json()["data"]]

    wait_for(serving, 300, f"the inference service to serve {model}", interval=2)
    url = f"{run.args.inference}/v1/chat/completions"
    anon = httpx.post(url, json={"model": model, **CHAT}, timeout=120)
    r = httpx.post(url, json={"model": model, **CHAT}, headers=key, timeout=120)
    text = _answer(r)
    run.record(
        "chat on the inference port: key from .env required and accepted",
        anon.status_code == 401 and bool(text),
        f"without: {anon.status_code}, with: {r.status_code} {model}: {text!r}"[:100],
    )
    # The console's path: the API relays to the inference service with the key, the client sends
    # only the API's bearer token.
    relayed = run.api.post("/v1/chat/completions", json={"model": model, **CHAT}, timeout=120)
    text = _answer(relayed)
    run.record(
        "chat through the API's /v1 relay (API token only)",
        bool(text),
        f"{relayed.status_code}: {text!r}"[:100],
    )


# --- 5. GPU device start check -------------------------------------------------------------------------
FAKE_GID = "4242"


def check_device_start(run: Run) -> None:
    """A char device node owned by root:4242, mode 0660, passed as /dev/kfd: the non-root worker
    cannot open it unless the container gets GID 4242 (numeric group_add, as compose.yaml does)."""
    node = Path(run.args.run_dir) / "kfd"
    if not node.exists():
        os.mknod(node, 0o660 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
    os.chown(node, 0, int(FAKE_GID))
    os.chmod(node, 0o660)
    base = ["run", "--rm", "--label", LABEL, "--device", f"{node}:/dev/kfd", "-e", "NCP_HOME=/tmp/ncp"]
    cmd = [run.args.image, "ncp", "worker", "--queues", "train", "--check"]
    denied = subprocess.run(["docker", *base, *cmd], capture_output=True, text=True, timeout=300)
    wrong = subprocess.run(["docker", *base, "-e", "RENDER_GID=render", "--group-add", FAKE_GID, *cmd],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    allowed = subprocess.run(["docker", *base, "-e", f"RENDER_GID={FAKE_GID}", "--group-add", FAKE_GID, *cmd],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    ok = (
        denied.returncode == 2
        and "cannot open /dev/kfd" in denied.stderr
        and "RENDER_GID" in denied.stderr
        and "getent group video render" in denied.stderr
        and wrong.returncode == 2
        and "RENDER_GID='render' is not a number" in wrong.stderr
        and allowed.returncode == 0
    )
    run.record(
        "train worker start check names the GPU group fix",
        ok,
        f"no group: rc {denied.returncode}; RENDER_GID=render: rc {wrong.returncode}; "
        f"numeric group_add: rc {allowed.returncode} {(denied.stderr + wrong.stderr + allowed.stderr).strip()[-300:] if not ok else ''}",
    )


# --- 6. HumanEval sandbox in the eval image ----------------------------------------------------------
PROBE = Path(__file__).with_name("sandbox_probe.py")
CANARY = "ncp-e2e-canary-5d1c"


def _probe(run: Run, name: str, argv: list[str]) -> None:
    """Run sandbox_probe.py with `argv` (docker exec/run ... python -) and record its verdict."""
    r = subprocess.run(
        ["docker", *argv], input=PROBE.read_text(), capture_output=True, text=True, timeout=300
    )
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        out = {"ok": False, "checks": {"probe": (r.stderr or r.stdout).strip()[-300:]}}
    run.record(
        name, r.returncode == 0 and out["ok"], "; ".join(f"{k}: {v}" for k, v in out["checks"].items())
    )


def pod_security_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """`docker run` flags for what a pod's securityContext asks of the runtime (the parts the
    sandbox depends on): user and group, seccomp, AppArmor, /proc masking, read-only root, caps."""
    psc, csc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    sc = {**psc, **csc}
    flags = ["--user", f"{sc.get('runAsUser', 0)}:{sc.get('runAsGroup', 0)}"]
    for gid in [sc.get("fsGroup"), *(sc.get("supplementalGroups") or [])]:
        if gid is not None:
            flags += ["--group-add", str(gid)]
    seccomp = (sc.get("seccompProfile") or {"type": "RuntimeDefault"})["type"]
    if seccomp == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    elif seccomp == "Localhost":  # the profile the chart's docs say to install on the nodes
        flags += ["--security-opt", f"seccomp={REPO / 'docker' / 'seccomp' / 'eval-sandbox.json'}"]
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        flags += ["--security-opt", "apparmor=unconfined"]
    if sc.get("procMount") == "Unmasked":
        flags += ["--security-opt", "systempaths=unconfined"]
    if sc.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--tmpfs", "/tmp"]
    for cap in (sc.get("capabilities") or {}).get("drop", []):
        flags += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    return flags


def check_sandbox(run: Run) -> None:
    # compose: the running eval worker, as compose.cpu.yaml started it
    _probe(
        run,
        "HumanEval sandbox escapes fail in the compose eval worker",
        ["exec", "-i", "-e", f"NCP_E2E_CANARY={CANARY}", "-e", f"NCP_CANARY_SECRET={CANARY}",
         run.container("eval-worker-cpu"), "python", "-"],
    )  # fmt: skip
    # Helm: the chart's eval worker pod, its security context as docker flags, in the same image
    dep = next(
        o
        for o in render_chart({})
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-eval-worker")
    )
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _probe(
        run,
        "HumanEval sandbox escapes fail under the chart's eval pod settings",
        ["run", "--rm", "-i", "--label", LABEL, "--network", "none", *pod_security_flags(pod, container),
         "-e", f"NCP_E2E_CANARY={CANARY}", "-e", f"NCP_CANARY_SECRET={CANARY}", run.args.image, "python", "-"],
    )  # fmt: skip


# --- 7. multi-node rendezvous ----------------------------------------------------------------------------
def render_chart(extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects for an install with `extra` values, rendered by Helm's own engine."""
    import helm_python as helm
    import yaml

    values = {
        "secrets": {"apiToken": "e2e-token", "inferenceApiKey": "e2e-key"},
        "postgresql": {"password": "e2e-password"},
        "gpu": {"supplementalGroups": [44, 110]},
        **extra,
    }
    with helm.Chart.load(str(REPO / "helm" / "nanochat-platform")) as chart:
        out = chart.render(values, name="ncp", namespace="e2e", is_install=True)
    return [
        obj
        for path, text in out.items()
        if not path.endswith(".txt")  # NOTES.txt
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def chart_pod(job_id: str, nodes: int) -> dict[str, Any]:
    """The trainer container of the chart's multi-node Job."""
    for obj in render_chart(
        {"multinode": {"enabled": True, "jobId": job_id, "nodes": nodes, "nprocPerNode": 1}}
    ):
        if obj.get("kind") == "Job" and obj["metadata"]["name"].startswith("ncp-train-"):
            return obj
    raise CheckFailed("the chart rendered no multi-node Job")


PREPARE = """
import json, sys
from pathlib import Path
from shared.nanochat.corpus import iter_shard_texts, split_shards
from shared.nanochat.demo_corpus import write_demo_corpus
from shared.nanochat.tokenizer import train_tokenizer
from shared.nanochat.train import TrainConfig
home, job = Path(sys.argv[1]), sys.argv[2]
data, run = home / "mn-data", home / "runs" / job
write_demo_corpus(data, num_shards=3, seed=0, max_bytes=300_000)
train_tokenizer(iter_shard_texts(split_shards(data)[0]), vocab_size=512, out_dir=home / "mn-tok")
run.mkdir(parents=True, exist_ok=True)
cfg = TrainConfig(data_dir=str(data), tokenizer_dir=str(home / "mn-tok"), checkpoint_dir=str(run / "ckpt"),
    depth=2, aspect_ratio=32, head_dim=64, max_seq_len=64, window_pattern="L", device_batch_size=4,
    total_batch_size=512, num_iterations=3, warmup_steps=1, eval_every=0, eval_tokens=1024, device="cpu", seed=7)
(run / "pretrain_config.json").write_text(json.dumps(cfg.to_dict()))
"""


def check_multinode(run: Run) -> None:
    job_id, nodes = "mn-e2e", 2
    job = chart_pod(job_id, nodes)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    name, service = job["metadata"]["name"], pod["subdomain"]
    home = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "ncp-home")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    volume, net = f"{LABEL}-mn-home", f"{LABEL}-mn"
    docker("volume", "create", "--label", LABEL, volume)
    # A fixed subnet: pod 0 leaves and rejoins the network with the same address, which its
    # /etc/hosts entry (its hostname, what gloo advertises) keeps naming.
    docker("network", "create", "--label", LABEL, "--subnet", "10.213.250.0/24", net)
    docker("run", "--rm", "--label", LABEL, "-v", f"{volume}:{home}", "-e", "OMP_NUM_THREADS=1",
           run.args.image, "python", "-c", PREPARE, home, job_id)  # fmt: skip
    started = {}
    # Pod 0 starts without its DNS name "<job>-0.<service>" (the kubelet's record can lag the pod),
    # rank 1 five seconds later; 20 s on, pod 0 rejoins the network under that name.
    for index in (0, 1):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["command"]]
        pod_env = {**env, "JOB_COMPLETION_INDEX": str(index), "OMP_NUM_THREADS": "1"}
        envs = [x for k, v in pod_env.items() for x in ("-e", f"{k}={v}")]
        host = f"{name}-{index}"
        alias = ["--network-alias", f"{host}.{service}"] if index else []
        started[index] = docker(
            "run", "-d", "--label", LABEL, "--name", f"{LABEL}-{host}", "--hostname", host,
            "--network", net, "--ip", f"10.213.250.{10 + index}", *alias, "-v", f"{volume}:{home}",
            *envs, run.args.image, *argv,
        ).strip()  # fmt: skip
        time.sleep(5)
    time.sleep(15)
    unresolved = docker("exec", started[0], "getent", "hosts", f"{name}-0.{service}", check=False).strip()
    docker("network", "disconnect", net, started[0])
    docker("network", "connect", "--ip", "10.213.250.10", "--alias", f"{name}-0.{service}", net, started[0])
    codes = {i: int(docker("wait", c, timeout=600).strip()) for i, c in started.items()}
    logs = {i: docker("logs", c, check=False) for i, c in started.items()}
    progress = docker("run", "--rm", "--label", LABEL, "-v", f"{volume}:{home}", run.args.image,
                      "cat", f"{home}/runs/{job_id}/progress.jsonl", check=False)  # fmt: skip
    steps = [json.loads(line).get("step") for line in progress.splitlines() if '"progress"' in line]
    for c in started.values():
        docker("rm", "-f", c, check=False)
    docker("volume", "rm", volume, check=False)
    docker("network", "rm", net, check=False)
    ok = not unresolved and codes == {0: 0, 1: 0} and steps == [1, 2, 3] and '"done"' in progress
    run.record(
        "multi-node pod command: 2 containers, pod 0 resolving late",
        ok,
        f"{' '.join(container['command'][4:6])}; pod 0's name unresolved for 25 s "
        f"({'yes' if not unresolved else 'NO: ' + unresolved}); exit codes {codes}, steps {steps}"
        + ("" if ok else f"\n{logs[0][-1500:]}\n{logs[1][-1500:]}"),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--env-file", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--inference", required=True)
    p.add_argument("--image", required=True, help="the worker-cpu image (start check, multi-node)")
    p.add_argument("--checks", required=True)
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--only", default="", help="comma list of steps: api,job,chat,sandbox,device,multinode")
    args = p.parse_args(argv)
    run = Run(args)
    steps = {
        "api": check_api,
        "job": run_job,
        "chat": check_chat,
        "sandbox": check_sandbox,
        "device": check_device_start,
        "multinode": check_multinode,
    }
    only = [s for s in args.only.split(",") if s] or list(steps)
    try:
        for name in only:
            steps[name](run)
    except Exception as e:  # any failure is this step's: recorded, not a bare traceback
        if not getattr(e, "recorded", False):
            with run.checks.open("a") as f:
                f.write(f"scenario step {name!r}\tFAIL\t{str(e)[:300]}\n")
        print(f"[scenario] FAILED in {name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
