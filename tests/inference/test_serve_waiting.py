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
