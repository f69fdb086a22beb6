"""Embedded mode: `ncp up` (SQLite registry, kombu's SQLite broker, no servers) and `ncp demo`.

`ncp demo` starts `ncp up` itself, submits the demo pipeline through the API, follows it, asks
the served model a question over /v1/chat/completions and stops the platform again. This is the
README's main command, run for real, on a fresh NCP_HOME and free ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embedded_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update({
        "NCP_HOME": str(home), "NCP_API_PORT": str(_free_port()), "NCP_INFERENCE_PORT": str(_free_port()),
        "NCP_INFERENCE_ENGINE": "native", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    return env


def _platform_processes(home: Path) -> list[int]:
    """Processes whose environment points at this test's NCP_HOME (ours, nobody else's)."""
    found = []
    needle = f"NCP_HOME={home}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_ncp_demo_end_to_end(tmp_path):
    home = tmp_path / "home"
    env = _embedded_env(home)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:] + _logs(home)
    assert "starting the platform" in out
    assert f"web console http://127.0.0.1:{env['NCP_API_PORT']}/console/" in out
    lines = out.splitlines()
    you = next(i for i, line in enumerate(lines) if line.startswith("You: "))
    model, _, reply = lines[you + 1].partition(": ")
    assert model.startswith("demo-") and reply.strip()
    assert "val_bpb" in out and "chatcore" in out
    report = Path(next(line for line in lines if line.startswith("report: ")).split(": ", 1)[1])
    assert report.is_file() and report.is_relative_to(home)
    assert (home / "registry.db").is_file() and (home / "broker.db").is_file()  # embedded defaults
    served = json.loads((home / "serving" / "current.json").read_text())
    assert served["model"] == model
    # The demo started the platform, so it stopped it: nothing of it is left running.
    deadline = time.monotonic() + 20
    while _platform_processes(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _platform_processes(home) == []
    print(f"ncp demo took {took:.0f}s")


@pytest.mark.slow
def test_ncp_up_serves_jobs_and_restarts_crashed_children(tmp_path):
    home = tmp_path / "home"
    env = _embedded_env(home)
    api = f"http://127.0.0.1:{env['NCP_API_PORT']}"
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--no-inference"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(timeout=10) as client:
            _wait(lambda: _ok(client, f"{api}/healthz"), 60, "the API")
            state = json.loads((home / "up.json").read_text())
            assert state["pid"] == up.pid

            spec = {
                "kind": "pretrain",
                "stages": ["data", "tokenizer"],
                "model": {"depth": 2, "head_dim": 64, "vocab_size": 512, "sequence_len": 64},
                "tokenizer": {"vocab_size": 512},
                "hardware": {"gpus": 0, "device": "cpu"},
            }
            job = client.post(f"{api}/jobs", json=spec).json()
            done = _wait(lambda: _terminal(client, f"{api}/jobs/{job['id']}"), 90, "the job")
            assert done["status"] == "succeeded"
            assert [s["name"] for s in done["stages"]] == ["data", "tokenizer", "report"]

            # Kill the data worker's whole process group: `ncp up` restarts it and jobs still run.
            worker_pid = _child_pid(home, "worker-data")
            os.killpg(worker_pid, signal.SIGKILL)
            _wait(lambda: _child_pid(home, "worker-data") not in (None, worker_pid), 30, "a restarted worker")
            job2 = client.post(f"{api}/jobs", json=spec).json()
            assert (
                _wait(lambda: _terminal(client, f"{api}/jobs/{job2['id']}"), 90, "job 2")["status"]
                == "succeeded"
            )
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "worker-data: exited with -9" in text and "all children stopped" in text
    assert not (home / "up.json").exists()
    assert _platform_processes(home) == []


def _child_pid(home: Path, name: str) -> int | None:
    """Pid of the newest start of child `name`, read from `ncp up`'s own log of starts."""
    for pid in reversed(_platform_processes(home)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        queue = name.removeprefix("worker-").encode()
        if b"worker" in cmd and queue in cmd and os.getpgid(pid) == pid:
            return pid
    return None


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _terminal(client: httpx.Client, url: str) -> dict | None:
    job = client.get(url).json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _logs(home: Path) -> str:
    out = []
    for p in sorted((home / "logs").glob("*.log")):
        out.append(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}")
    return "".join(out)
