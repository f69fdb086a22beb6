"""Serving throughput and latency: vLLM (with our plugin) vs the native server, same model, one run.

    .venv/bin/python bench/serve.py [--depth 4] [--dim 256] [--max-tokens 32] [--vllm-args "--enforce-eager"]

Builds a random-weight nanochat model (head_dim 64), exports it, then serves it with each engine
in turn (never both at once, so they don't share the CPU) and sends greedy chat-free completion
requests at concurrency 1, 8 and 32. Greedy decoding of the same model gives both engines the
same tokens, so output tokens/s compare like for like. Prints a table with the vLLM/native ratio.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.inference.serve import ServeConfig, child_command  # noqa: E402
from shared.nanochat.config import GPTConfig  # noqa: E402
from shared.nanochat.export import write_export  # noqa: E402
from shared.nanochat.gpt import GPT  # noqa: E402
from shared.nanochat.tokenizer import train_tokenizer  # noqa: E402


def build_model(root: Path, depth: int, dim: int, seq_len: int) -> Path:
    texts = [inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap, inspect)]
    tok = train_tokenizer(texts, vocab_size=1024, out_dir=root / "tokenizer")
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=depth, n_head=dim // 64,
                    n_kv_head=dim // 64, n_embd=dim, window_pattern="SSSL")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_export(model, cfg, root / "tokenizer", root / "export", served_name="bench", dtype="float32")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become healthy")


def run_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    def one(prompt):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    one(prompts[0])  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    lat = sorted(t for t, _ in results)
    return {"tok_s": tokens / wall, "p50": statistics.median(lat), "p90": lat[int(0.9 * (len(lat) - 1))],
            "tokens": tokens}  # fmt: skip


def bench_engine(engine: str, export: Path, args, levels) -> dict:
    port = _free_port()
    cfg = ServeConfig(engine=engine, port=port, vllm_python=args.vllm_python, dtype="float32",
                      gpu_memory_utilization=0.3, max_model_len=args.seq_len,
                      vllm_extra_args=tuple(shlex.split(args.vllm_args)))  # fmt: skip
    cmd = child_command(cfg, engine, "bench", str(export))
    if engine == "native":
        cmd += ["--max-batch", str(max(levels))]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        g = torch.Generator().manual_seed(1)
        out = {}
        for c in levels:
            n = max(4, c)
            prompts = [torch.randint(0, 1000, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
            out[c] = run_level(url, prompts, c, args.max_tokens)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument(
        "--vllm-args", default="--enforce-eager", help="extra vLLM flags (CPU: compile takes minutes)"
    )
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        export = build_model(Path(tmp), args.depth, args.dim, args.seq_len)
        native = bench_engine("native", export, args, levels)
        vllm = bench_engine("vllm", export, args, levels)
    print(f"model: depth {args.depth}, dim {args.dim}, head_dim 64, fp32; prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} greedy output tokens; device cpu ({os.cpu_count()} cores)")  # fmt: skip
    print(
        "| concurrency | native tok/s | vLLM tok/s | vLLM/native | native p50 s | vLLM p50 s | native p90 s | vLLM p90 s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        n, v = native[c], vllm[c]
        print(f"| {c} | {n['tok_s']:.1f} | {v['tok_s']:.1f} | {v['tok_s'] / n['tok_s']:.2f} | {n['p50']:.2f} | "
              f"{v['p50']:.2f} | {n['p90']:.2f} | {v['p90']:.2f} |")  # fmt: skip
        if n["tokens"] != v["tokens"]:
            print(
                f"  note: output token counts differ at concurrency {c}: native {n['tokens']}, vLLM {v['tokens']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
