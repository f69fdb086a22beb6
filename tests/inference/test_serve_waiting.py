"""The serving supervisor before the first publish: its port answers `/health` with "no model yet"
(healthy, so `docker compose up --wait` and `helm install --wait` finish on a fresh install) and
every model route with 503, until a published model's engine takes the port over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.inference.publish import publish_model

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _wait(cond, timeout=120.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_says_no_model_yet_until_the_first_publish(tiny_run, tmp_path):
    home = tmp_path / "home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, NCP_HOME=str(home), OMP_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child's output for its lifetime
    sup = subprocess.Popen(
        [sys.executable, "-m", "services.inference.serve", "--engine", "native", "--port", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        health = _wait(lambda: _get(url + "/health"), what="the supervisor's port")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "waiting" and "no model yet" in health.json()["detail"]
        models = _get(url + "/v1/models")
        assert models is not None and models.status_code == 503
        assert "no model yet" in models.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "x", "messages": []}, timeout=5)
        assert r.status_code == 503

        publish_model(home / "serving", "tiny-a", tiny_run["export_dir"])

        def served() -> bool:
            r = _get(url + "/v1/models")
            return (
                r is not None and r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny-a"]
            )

        _wait(served, what="the engine to take the port over")
        health = _get(url + "/health")
        assert health is not None and health.status_code == 200
        assert health.json().get("status") != "waiting"  # the engine answers now, not the stand-in
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(60)
        log.close()
    assert sup.returncode == 0


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_engine_stops_when_the_supervisor_is_killed(tiny_run, tmp_path):
    """The engine runs in its own process group (stopping it stops its workers), so a supervisor
    killed with -9 must not leave it behind holding the port: it gets SIGTERM when its parent dies."""
    port = _free_port()
    env = dict(os.environ, NCP_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    env.pop("NCP_INFERENCE_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference.serve", "--engine", "native", "--port", str(port),
         "--host", "127.0.0.1", "--model", str(tiny_run["export_dir"])],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait(lambda: (r := _get(f"http://127.0.0.1:{port}/v1/models")) is not None and r.status_code == 200,
              what="the supervised native server")  # fmt: skip
        engines = _children(proc.pid)
        assert len(engines) == 1, engines
        proc.kill()  # the supervisor alone, -9: no handler of its own runs
        proc.wait(30)
        _wait(lambda: not _alive(engines[0]), 60, what=f"engine {engines[0]} to stop with its supervisor")
        _wait(lambda: _get(f"http://127.0.0.1:{port}/health") is None, 30, what="the port to close")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
