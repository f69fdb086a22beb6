"""Chat through the API: the /v1 relay in front of a real native model server (streamed, guarded by
the API's token), and `ncp chat` on top of it, one-shot (-p) and interactive (/clear, /exit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from services.api.app import create_app as create_api
from services.api.migrate import upgrade
from services.inference.native.app import create_app as create_native
from shared.nanochat.export import load_exported
from shared.settings import Settings
from tests.api.conftest import LiveServer, free_port

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
TOKEN = "relay-test-token-123"


@pytest.fixture(scope="module")
def native(tiny_run):
    model, tok = load_exported(tiny_run["export_dir"])
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_native(model, tok, "tiny", max_batch=4), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "native server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def api(native, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    url = f"sqlite:///{tmp / 'registry.db'}"
    upgrade(url)
    settings = Settings(
        home=tmp / "home", database_url=url, broker_url=f"sqla+sqlite:///{tmp / 'broker.db'}",
        inference_url=native, api_token=TOKEN,
    )  # fmt: skip
    with LiveServer(create_api(settings)) as srv:
        yield srv.url


def greedy(native: str, messages: list[dict], max_tokens: int = 24) -> str:
    body = {"model": "tiny", "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}
    return httpx.post(f"{native}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
        "content"
    ]


def test_relay_streams_and_needs_the_token(api, native):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{api}/v1/models").status_code == 401
    assert httpx.get(f"{api}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "def f"}],
        "temperature": 0.0,
        "max_tokens": 24,
    }
    chunks = []
    with httpx.stream(
        "POST", f"{api}/v1/chat/completions", json={**body, "stream": True}, headers=auth, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join((c["choices"][0]["delta"] or {}).get("content", "") for c in chunks if c["choices"])
    assert len(chunks) > 3 and text == greedy(native, body["messages"])  # token by token, same answer
    # the model server's own errors come back as they are
    bad = httpx.post(f"{api}/v1/chat/completions", json={**body, "model": "nope"}, headers=auth, timeout=30)
    assert bad.status_code == 404 and "nope" in bad.json()["error"]["message"]


def test_relay_without_a_model_server(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    settings = Settings(
        home=tmp_path / "home", database_url=url, inference_url=f"http://127.0.0.1:{free_port()}"
    )
    from fastapi.testclient import TestClient

    with TestClient(create_api(settings)) as c:
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": []})
        assert r.status_code == 503 and r.json()["error"]["code"] == "inference_unavailable"


def _ncp(api: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update(NCP_API_URL=api, NCP_API_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "chat", *args],
        cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_ncp_chat_one_shot(api, native):
    r = _ncp(api, "-p", "def f", "--temperature", "0", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy(native, [{"role": "user", "content": "def f"}]) + "\n"


def test_ncp_chat_interactive_history_clear_exit(api, native):
    r = _ncp(
        api, "--temperature", "0", "--max-tokens", "12", stdin="hello\nagain\n/clear\nhello\n/exit\nnever\n"
    )
    assert r.returncode == 0, r.stderr
    first = greedy(native, [{"role": "user", "content": "hello"}], 12)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = greedy(native, [*history, {"role": "user", "content": "again"}], 12)
    prompt = "\nyou> "
    # turn 2 sees turn 1; after /clear the same question gets the first answer again; /exit stops
    assert r.stdout == (
        f"chatting with tiny at {api}; /clear starts a new conversation, /exit (or Ctrl-D) quits\n"
        f"{prompt}tiny> {first}\n{prompt}tiny> {second}\n{prompt}(new conversation)\n{prompt}tiny> {first}\n{prompt}"
    )
    assert first != second


def test_ncp_chat_reports_an_unreachable_server():
    r = _ncp(f"http://127.0.0.1:{free_port()}", "-p", "hi")
    assert r.returncode == 1 and "cannot reach" in r.stderr
