"""publish_model + the serving supervisor, with the native engine as the real child server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from services.inference.publish import publish_model, read_current
from services.inference.serve import (
    ServeConfig,
    Supervisor,
    child_command,
    cpu_kv_cache_bytes,
    resolve_engine,
    vllm_memory_args,
)
from services.inference.served_state import read_state

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_is_atomic_and_validated(tiny_run, tmp_path):
    serving = tmp_path / "serving"
    rec = publish_model(serving, "tiny", tiny_run["export_dir"])
    assert read_current(serving) == json.loads((serving / "current.json").read_text()) == rec
    assert rec["path"] == str(tiny_run["export_dir"].resolve())
    assert sorted(p.name for p in serving.iterdir()) == ["current.json"]  # no temp files left
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run["export_dir"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        publish_model(serving, "broken", broken)
    assert read_current(serving)["model"] == "tiny"  # the previous record survives
    with pytest.raises(ValueError, match="name"):
        publish_model(serving, " ", tiny_run["export_dir"])
    (serving / "current.json").write_text("{oops")
    with pytest.raises(ValueError, match="current.json"):
        read_current(serving)


def test_engine_choice_and_commands(tmp_path):
    vllm_python = REPO / ".venv-vllm" / "bin" / "python"
    if vllm_python.exists():  # the CPU build of vLLM: it says it runs on the CPU
        assert resolve_engine(ServeConfig(engine="auto", vllm_python=str(vllm_python))) == ("vllm", "cpu")
    no_vllm = tmp_path / "python"
    no_vllm.write_text("#!/bin/sh\nexit 1\n")
    no_vllm.chmod(0o755)
    assert resolve_engine(ServeConfig(engine="auto", vllm_python=str(no_vllm))) == ("native", None)
    assert resolve_engine(ServeConfig(engine="native", vllm_python=str(no_vllm))) == ("native", None)
    cfg = ServeConfig(engine="vllm", port=9000, vllm_python="/v/bin/python", dtype="float32", max_model_len=256,
                      vllm_extra_args=("--enforce-eager",))  # fmt: skip
    cmd = child_command(cfg, "vllm", "m", "/exp", "cuda")
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for pair in (["--served-model-name", "m"], ["--port", "9000"], ["--max-model-len", "256"], ["--dtype", "float32"],
                 ["--chat-template-content-format", "string"]):  # fmt: skip
        i = cmd.index(pair[0])
        assert cmd[i : i + 2] == pair
    assert cmd[-1] == "--enforce-eager"
    with pytest.raises(ValueError, match="engine"):
        ServeConfig(engine="tgi")


def test_vllm_memory_defaults_work_on_cpu_and_gpu():
    gib = 1 << 30
    # GPU: vLLM's own default share; CPU: an explicit KV cache sized from the RAM free now, because
    # a share of all RAM (0.9 by default) fails as soon as anything else runs on the machine
    assert vllm_memory_args(ServeConfig(), "cuda") == []
    assert vllm_memory_args(ServeConfig(), "cpu", available_bytes=16 * gib) == [
        "--kv-cache-memory-bytes",
        str(2 * gib),
    ]
    assert vllm_memory_args(ServeConfig(), "cpu", available_bytes=4 * gib) == [
        "--kv-cache-memory-bytes",
        str(gib),
    ]
    assert cpu_kv_cache_bytes(gib) == gib // 2
    configured = ServeConfig(gpu_memory_utilization=0.3)
    assert (
        vllm_memory_args(configured, "cpu")
        == vllm_memory_args(configured, "cuda")
        == ["--gpu-memory-utilization", "0.3"]
    )
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServeConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="first_backoff_seconds"):
        ServeConfig(first_backoff_seconds=0)


def test_repeated_start_failure_is_a_clear_error_in_the_state_file(tiny_run, tmp_path):
    """A real native engine that cannot bind its port exits at once, again and again: the
    supervisor backs off (doubling), then reports "failed" with the engine's own reason; once the
    port is free it recovers to "running"."""
    home = tmp_path / "home"
    publish_model(home / "serving", "tiny", tiny_run["export_dir"])
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()  # never answers: the port is taken and /health never succeeds
    port = blocker.getsockname()[1]
    cfg = ServeConfig(engine="native", port=port, poll_seconds=0.1, first_backoff_seconds=0.2,
                      max_backoff_seconds=0.8, max_start_failures=2)  # fmt: skip
    sup = Supervisor(cfg, home / "serving")
    seen: list[dict] = []

    def state_is(name):
        sup.step()
        st = read_state(home / "serving")
        if st and (not seen or seen[-1]["state"] != st["state"]):
            seen.append(st)
        return st if st and st["state"] == name else None

    try:
        failed = _wait(lambda: state_is("failed"), timeout=300, what="state failed")
        assert failed["model"] == "tiny" and failed["engine"] == "native" and failed["start_failures"] == 2
        assert "failed to start 2 times in a row" in failed["error"]
        assert "address already in use" in failed["error"].lower()  # the engine's own reason
        assert failed["last_exit_code"] not in (0, None) and failed["log_tail"]
        assert [st["state"] for st in seen][:3] == ["starting", "restarting", "starting"]
        assert sup._backoff == 0.8  # 0.2 -> 0.4 -> 0.8: doubled, then capped
        blocker.close()
        running = _wait(lambda: state_is("running"), timeout=300, what="recovery")
        assert running["error"] is None and running["start_failures"] == 0 and running["pid"]
        assert _models(f"http://127.0.0.1:{port}") == ["tiny"]
    finally:
        blocker.close()
        sup.stop()


def _models(url: str) -> list[str] | None:
    try:
        r = httpx.get(url + "/v1/models", timeout=2)
        return [m["id"] for m in r.json()["data"]] if r.status_code == 200 else None
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


def test_supervisor_restarts_on_publish_and_crash(tiny_run, tmp_path):
    home = tmp_path / "home"
    publish_model(home / "serving", "tiny-a", tiny_run["export_dir"])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, NCP_HOME=str(home), OMP_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "wb")
    sup = subprocess.Popen(
        [sys.executable, "-m", "services.inference.serve", "--engine", "native", "--port", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait(lambda: _models(url) == ["tiny-a"], what="first model")
        r = httpx.post(
            url + "/v1/completions", json={"model": "tiny-a", "prompt": "def", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

        publish_model(home / "serving", "tiny-b", tiny_run["export_dir"])  # the pipeline publishes again
        _wait(lambda: _models(url) == ["tiny-b"], what="restart on the new model")

        (child,) = psutil.Process(sup.pid).children()
        publish_model(home / "serving", "tiny-b", tiny_run["export_dir"])  # same name and folder, new export
        _wait(
            lambda: [c.pid for c in psutil.Process(sup.pid).children()] not in ([], [child.pid]),
            what="re-publish",
        )
        _wait(lambda: _models(url) == ["tiny-b"], what="service back after the re-publish")

        (child,) = psutil.Process(sup.pid).children()
        child.kill()  # the engine crashes
        child.wait(10)
        _wait(
            lambda: [c.pid for c in psutil.Process(sup.pid).children()] not in ([], [child.pid]),
            what="respawn",
        )
        _wait(lambda: _models(url) == ["tiny-b"], what="service back after the crash")
        assert sup.poll() is None
        (child,) = psutil.Process(sup.pid).children()
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(60)
        log.close()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE  # supervisor stopped its engine
    assert sup.returncode == 0
