"""The native OpenAI server, exercised over real HTTP with the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from services.inference.native.app import create_app
from services.inference.native.batcher import GenerationRequest, SamplingParams
from shared.nanochat.chat_format import render_for_completion
from shared.nanochat.engine import Engine
from shared.nanochat.export import load_exported

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    model, tok = load_exported(tiny_run["export_dir"])
    app = create_app(model, tok, "tiny", max_batch=8)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    yield {"client": client, "url": f"http://127.0.0.1:{port}", "model": model, "tok": tok, "app": app}
    srv.should_exit = True
    thread.join(10)


def _engine_greedy(server, prompt: list[int], max_tokens: int) -> str:
    engine = Engine(server["model"], server["tok"])
    seqs, _ = engine.generate_batch(prompt, 1, max_tokens=max_tokens, temperature=0.0)
    # The server leaves special tokens out of returned text, as vLLM does by default.
    hidden = set(server["tok"].special_ids.values())
    return server["tok"].decode([t for t in seqs[0][len(prompt) :] if t not in hidden])


CHATS = [
    [{"role": "user", "content": "What is the capacity of a json decoder?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def scan(s): return"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x"},
    ],
    [{"role": "user", "content": "import inspect\n" * 20}],
]


def test_health_and_models(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_chat_matches_engine(server):
    msgs = CHATS[0]
    r = server["client"].chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    prompt = render_for_completion(server["tok"], msgs)
    assert r.choices[0].message.content == _engine_greedy(server, prompt, 24)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_concurrent_requests_share_batches_and_match(server):
    batcher = server["app"].state.batcher
    steps_before = batcher.steps

    def ask(msgs):
        r = server["client"].chat.completions.create(
            model="tiny", messages=msgs, max_tokens=30, temperature=0
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(CHATS)) as pool:
        got = list(pool.map(ask, CHATS))
    for msgs, text in zip(CHATS, got, strict=True):
        assert text == _engine_greedy(server, render_for_completion(server["tok"], msgs), 30)
    assert batcher.max_rows_seen > 1, "concurrent requests never shared a decode step"
    assert batcher.steps - steps_before < len(CHATS) * 30


def test_streaming_equals_non_streaming(server):
    c = server["client"]
    kw = dict(model="tiny", messages=CHATS[1], max_tokens=20, temperature=0)
    full = c.chat.completions.create(**kw).choices[0].message.content
    stream = c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_completions_with_ids_and_text(server):
    c, tok = server["client"], server["tok"]
    prompt = tok.encode("def decode(self, s):", prepend="<|bos|>")
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _engine_greedy(server, prompt, 12)
    r2 = c.completions.create(model="tiny", prompt="def decode(self, s):", max_tokens=12, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    chunks = list(
        c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text


def test_sampling_n_seed_top_k_top_p(server):
    c = server["client"]
    kw = dict(
        model="tiny",
        messages=CHATS[0],
        max_tokens=16,
        temperature=1.0,
        n=3,
        seed=7,
        top_p=0.9,
        extra_body={"top_k": 50},
    )
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # seeds differ per sample


def test_stop_string(server):
    c, tok = server["client"], server["tok"]
    prompt = tok.encode("def decode(self, s):", prepend="<|bos|>")
    full = c.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(server):
    c = server["client"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=CHATS[0])
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json " * 400}])
    assert "maximum context length is 256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=250)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(
        server["url"] + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot"}]}
    )
    assert r.status_code == 400
    assert (
        set(r.json()["error"]) == {"message", "type", "param", "code"}
        and "messages" in r.json()["error"]["param"]
    )
    r = httpx.post(
        server["url"] + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny", "prompt": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=CHATS[0], stream=True, max_tokens=1000)


def test_calculator_tool_forces_result(server):
    batcher, tok = server["app"].state.batcher, server["tok"]
    from services.inference.native.batcher import _Row

    row = _Row(GenerationRequest([1], SamplingParams(max_tokens=5), lambda *a: None), 0, torch.Generator(), 1)
    for t in [
        tok.encode_special("<|python_start|>"),
        *tok.encode("12*3"),
        tok.encode_special("<|python_end|>"),
    ]:
        batcher._tool(row, t)
    forced = list(row.forced)
    assert forced[0] == tok.encode_special("<|output_start|>") and forced[-1] == tok.encode_special(
        "<|output_end|>"
    )
    assert tok.decode(forced[1:-1]) == "36"


def test_special_tokens_never_reach_the_returned_text(server):
    from services.inference.native.app import _Choice

    tok = server["tok"]
    choice = _Choice(tok, stop_ids={tok.encode_special("<|assistant_end|>")}, stop=[])
    ids = [
        *tok.encode("x = "),
        tok.encode_special("<|python_start|>"),
        *tok.encode("12*3"),
        tok.encode_special("<|python_end|>"),
        tok.encode_special("<|output_start|>"),
        *tok.encode("36"),
        tok.encode_special("<|output_end|>"),
    ]
    text = "".join(choice.add(t) for t in ids) + choice.add(tok.encode_special("<|assistant_end|>"))
    assert text == "x = 12*336"
    assert choice.n_tokens == len(ids) + 1  # hidden tokens still count as generated
