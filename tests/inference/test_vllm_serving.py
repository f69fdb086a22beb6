"""vLLM with our plugin serves the exported tiny model exactly like our own PyTorch model.

Runs the real stack: `python -m services.inference.serve --engine vllm` (the supervisor) starts
vLLM's OpenAI server from .venv-vllm (created by scripts/setup_vllm_venv.sh) on the published
export, with the repo's default memory settings on this CPU-only machine; requests go through the
official `openai` client. Parity: greedy tokens equal our model's greedy tokens (fp32 on CPU,
dtype float32 in vLLM) for prompts longer than the sliding window, issued concurrently
(continuous batching) and twice (the second time from the prefix cache); prompt logprobs agree
within 1e-4. The native server on the same folder tokenizes text prompts and chats the same way
(one BOS rule) and gives the same greedy completions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from services.inference.publish import publish_model
from shared.nanochat.chat_format import render_for_completion
from shared.nanochat.engine import Engine
from shared.nanochat.export import load_exported

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(), reason=".venv-vllm is absent: create it with scripts/setup_vllm_venv.sh"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_run, tmp_path_factory):
    home = tmp_path_factory.mktemp("ncp_home")
    publish_model(home / "serving", "tiny", tiny_run["export_dir"])
    port = _free_port()
    env = dict(
        os.environ,
        NCP_HOME=str(home),
        NCP_VLLM_PYTHON=str(VLLM_PYTHON),
        NCP_VLLM_DTYPE="float32",
        NCP_VLLM_MAX_MODEL_LEN="256",
        # No memory settings: the repo's defaults must start vLLM on a CPU-only machine.
        # Not --enforce-eager: the forward must go through vLLM's torch.compile (full graph, the
        # same capture CUDA graphs need), which proves it has no data-dependent Python control flow.
        NCP_VLLM_EXTRA_ARGS="--enable-prefix-caching",
    )
    for key in ("NCP_VLLM_GPU_MEMORY_UTILIZATION", "VLLM_CPU_KVCACHE_SPACE"):
        env.pop(key, None)
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference.serve", "--engine", "vllm", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"vLLM did not come up; log:\n{(home / 'serve.log').read_text()[-4000:]}")
        time.sleep(1)
    yield {"url": url, "client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0),
           "home": home, "proc": proc}  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def ours(tiny_run):
    torch.set_num_threads(1)
    return load_exported(tiny_run["export_dir"])


def _greedy(model, tok, prompt, n):
    seqs, _ = Engine(model, tok).generate_batch(prompt, 1, max_tokens=n, temperature=0.0)
    return seqs[0][len(prompt) :]


def test_greedy_parity_and_prompt_logprobs(vllm_server, ours):
    model, tok = ours
    client = vllm_server["client"]
    g = torch.Generator().manual_seed(3)
    # 200 tokens: past layer 0/2's 128-token window. Prompts share a prefix (prefix caching).
    base = torch.randint(0, 500, (200,), generator=g).tolist()
    prompts = [base, base[:150] + [7, 8, 9], tok.encode("def decode(self, s):", prepend="<|bos|>"), base[:60]]

    stops = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    want = [_greedy(model, tok, prompt, 20) for prompt in prompts]

    def ask(prompt, prompt_logprobs):
        extra = {"return_tokens_as_token_ids": True}
        if prompt_logprobs:
            extra["prompt_logprobs"] = 0  # vLLM recomputes such prompts: no prefix-cache reads
        return client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, logprobs=0, extra_body=extra
        )

    # Round 0: prompt logprobs; rounds 1-2: the same prompts again, round 2 from the prefix cache.
    for round_ in range(3):
        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: continuous batching
            results = list(pool.map(ask, prompts, [round_ == 0] * len(prompts)))
        for prompt, expected, r in zip(prompts, want, results, strict=True):
            got = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
            assert [t for t in got if t not in stops] == expected, f"round {round_}"
            if round_ == 0:
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
                plp = r.choices[0].model_extra["prompt_logprobs"]
                for j in range(1, len(prompt)):
                    assert abs(plp[j][str(prompt[j])]["logprob"] - float(lp[j - 1, prompt[j]])) < 1e-4
    # Later rounds were served from cached blocks (window layers and the smear layer included).
    metrics = httpx.get(vllm_server["url"] + "/metrics").text
    hits = [
        float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("vllm:prefix_cache_hits_total")
    ]
    assert hits and sum(hits) > 0


def test_chat_streaming_through_openai_client(vllm_server, ours):
    model, tok = ours
    client = vllm_server["client"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does json.dumps do?"},
    ]
    kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=0)
    full = client.chat.completions.create(
        **kw, logprobs=True, extra_body={"return_tokens_as_token_ids": True}
    )
    prompt = render_for_completion(tok, messages)
    assert full.usage.prompt_tokens == len(prompt)  # vLLM rendered our chat template to the SFT format
    got = [int(t.token.split(":")[1]) for t in full.choices[0].logprobs.content]
    stops = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    assert [t for t in got if t not in stops] == _greedy(model, tok, prompt, 16)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain


def test_supervisor_state_says_running_on_cpu(vllm_server):
    from services.inference.served_state import read_state

    state = read_state(vllm_server["home"] / "serving")
    assert state["state"] == "running" and state["engine"] == "vllm" and state["device"] == "cpu"
    assert state["model"] == "tiny" and state["error"] is None


@pytest.fixture(scope="module")
def native_server(tiny_run, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("native") / "native.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference.native", "--model", str(tiny_run["export_dir"]),
         "--name", "tiny", "--port", str(port)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the native server did not come up")
        time.sleep(0.5)
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    proc.terminate()
    proc.wait(30)
    log.close()


def test_both_engines_tokenize_and_complete_alike(vllm_server, native_server, ours):
    from shared.nanochat.tokenizer import prompt_ids

    model, tok = ours
    engines = {"vllm": vllm_server["client"], "native": native_server}
    for client in engines.values():  # an empty text prompt is refused by both
        with pytest.raises(openai.BadRequestError, match="non-empty"):
            client.completions.create(model="tiny", prompt="", max_tokens=4)
    texts = ["def decode(self, s):", "The capital of France is", "  indented\n\n12345 你好"]
    for text in texts:
        want_ids = prompt_ids(tok, text)  # the BOS rule, written once
        answers = {
            name: c.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0)
            for name, c in engines.items()
        }
        for name, r in answers.items():
            assert r.usage.prompt_tokens == len(want_ids), (name, text)
        assert answers["vllm"].choices[0].text == answers["native"].choices[0].text, text
        assert answers["vllm"].usage.completion_tokens == answers["native"].usage.completion_tokens, text
    for messages in (
        [{"role": "user", "content": "What does json.dumps do?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And 3+3?"}],
    ):  # fmt: skip
        answers = {
            name: c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
            for name, c in engines.items()
        }
        want = len(render_for_completion(tok, messages))
        assert {name: r.usage.prompt_tokens for name, r in answers.items()} == {"vllm": want, "native": want}
        assert answers["vllm"].choices[0].message.content == answers["native"].choices[0].message.content


def test_unknown_model_is_404(vllm_server):
    with pytest.raises(openai.NotFoundError):
        vllm_server["client"].chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
