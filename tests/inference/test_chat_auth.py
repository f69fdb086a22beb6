"""Access to the chat endpoint: a key when one is configured, loopback clients only without one.

The native server is run for real (uvicorn on a port, and as the serving supervisor's child with
the key in its environment); clients are the official `openai` client and plain HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from services.inference.native.app import create_app
from services.inference.serve import ServeConfig
from shared.nanochat.export import load_exported
from tests.waiting import wait_for

KEY = "chat-key-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ipv4() -> str | None:
    for target in ("10.255.255.255", "192.0.2.255"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # a UDP connect sends nothing; it only picks an interface
            except OSError:
                continue
            ip = s.getsockname()[0]
            if not ip.startswith("127."):
                return ip
    return None


class Server:
    def __init__(self, app, host: str = "127.0.0.1") -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 30, what="uvicorn to start")
        assert self.thread.is_alive()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return load_exported(tiny_run["export_dir"])


def test_key_is_required_and_the_openai_client_works_with_it(tiny):
    model, tok = tiny
    with Server(create_app(model, tok, "tiny", max_batch=2, api_key=KEY)) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        assert httpx.get(f"{base}/health").status_code == 200  # open: probes carry no key
        no_key = httpx.get(f"{base}/v1/models")
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny"]
        r = good.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length")


def test_without_a_key_only_loopback_clients_are_served(tiny):
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    model, tok = tiny
    with Server(create_app(model, tok, "tiny", max_batch=2), host="0.0.0.0") as srv:
        remote = httpx.get(f"http://{ip}:{srv.port}/v1/models")
        assert remote.status_code == 403 and remote.json()["error"]["code"] == "remote_access_disabled"
        assert httpx.get(f"http://{ip}:{srv.port}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{srv.port}/v1/models").status_code == 200
    with Server(create_app(model, tok, "tiny", max_batch=2, api_key=KEY), host="0.0.0.0") as srv:
        ok = httpx.get(f"http://{ip}:{srv.port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_servers_refuse_a_non_loopback_bind_without_a_key(tiny_run):
    with pytest.raises(ValueError, match="NCP_INFERENCE_API_KEY"):
        ServeConfig(engine="native", host="0.0.0.0")
    ServeConfig(engine="native", host="0.0.0.0", api_key=KEY)
    ServeConfig(engine="native", host="127.0.0.1")
    proc = subprocess.run(
        [sys.executable, "-m", "services.inference.native", "--model", str(tiny_run["export_dir"]),
         "--host", "0.0.0.0", "--port", str(_free_port()), "--device", "cpu"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "NCP_INFERENCE_API_KEY"},
    )  # fmt: skip
    assert proc.returncode == 2 and "NCP_INFERENCE_API_KEY" in proc.stderr


def test_supervisor_hands_the_key_to_its_engine(tiny_run, tmp_path):
    """`python -m services.inference.serve` with NCP_INFERENCE_API_KEY: the engine it starts wants
    the key (passed in the environment, not on a command line)."""
    port = _free_port()
    env = {
        **os.environ,
        "NCP_HOME": str(tmp_path),
        "NCP_INFERENCE_API_KEY": KEY,
        "NCP_INFERENCE_PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference.serve", "--engine", "native", "--model", str(tiny_run["export_dir"])],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                return False

        wait_for(up, 120, 0.5, what="the supervised native server")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [Path(tiny_run["export_dir"]).name]
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert KEY.encode() not in cmdline.read_bytes(), cmdline  # no command line carries it
            except OSError:
                continue  # a process that ended meanwhile
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
