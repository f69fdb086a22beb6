"""Attention-backend and decode benchmark for the nanochat model.

Run: .venv/bin/python bench/attention.py [--device auto|cpu|cuda] [--seq-len T] [--window W]
     [--heads H] [--head-dim D] [--batch B] [--iters N] [--decode-tokens N]

Measured in the same run, each row against a baseline from that run:
  * sliding-window attention (the S layers) and full causal attention (the L layers), forward
    (and forward+backward on GPU), per backend available on the device. Baseline: SDPA with an
    explicit boolean T x T mask, which is what the reference does for windows whenever
    FlashAttention-3 is missing (e.g. on ROCm). Every backend's output is checked against the fp32
    math reference before it is timed.
  * generation: Engine (prefill once, KV-cache decode) against recomputing the full forward for
    every new token (the reference's naive `GPT.generate`), same tiny model, greedy, same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shared.nanochat.attention import attention, available_backends, causal_window_mask  # noqa: E402
from shared.nanochat.config import GPTConfig  # noqa: E402
from shared.nanochat.engine import Engine  # noqa: E402
from shared.nanochat.gpt import GPT  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, iters: int) -> float:
    """Median seconds per call after two warm-up calls (compile / autotune happen there)."""
    fn()
    fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def explicit_mask_sdpa(q, k, v, window):
    """The reference's fallback: SDPA over a dense boolean mask (B, H, T, D layout inside)."""
    t = q.shape[1]
    mask = causal_window_mask(t, t, window, q.device)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return y.transpose(1, 2)


def attention_rows(args, device: str, dtype) -> list[tuple[str, float, float, str]]:
    b, t, h, d = args.batch, args.seq_len, args.heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    train = device == "cuda"  # flex has no CPU backward; on CPU time the forward only
    rows = []
    for label, window in (("window", args.window), ("full", t)):
        want = attention(q, k, v, window=window, backend="math").float()

        def run(fn, window=window):
            if not train:
                with torch.no_grad():
                    return fn(q, k, v, window)
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            out = fn(qq, kk, vv, window)
            out.float().sum().backward()
            return out

        base = timed(lambda: run(explicit_mask_sdpa), device, args.iters)
        what = "fwd+bwd" if train else "fwd"
        rows.append((f"{label} {what}: sdpa + explicit mask (baseline)", base, base, "ms"))
        for backend in available_backends(device):
            if backend == "math" and device == "cuda":
                continue  # fp32 T x T scores: reference only

            def fn(qq, kk, vv, w, backend=backend):
                return attention(qq, kk, vv, window=w, backend=backend)

            with torch.no_grad():
                err = (fn(q, k, v, window).float() - want).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            if err > tol:
                raise SystemExit(f"{backend} differs from the math reference by {err:.3g} ({label})")
            rows.append(
                (f"{label} {what}: {backend}", timed(lambda fn=fn: run(fn), device, args.iters), base, "ms")
            )
    return rows


def decode_rows(args, device: str) -> list[tuple[str, float, float, str]]:
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)
    model = GPT(cfg).to(device)
    model.init_weights()
    model.eval()
    prompt = torch.randint(0, 512, (args.prompt_len,)).tolist()
    n = args.decode_tokens

    @torch.no_grad()
    def naive():
        ids = torch.tensor([prompt], device=device)
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids[0, len(prompt) :].tolist()

    engine = Engine(model)

    def cached():
        return [c[0] for c, _ in engine.generate(prompt, max_tokens=n, temperature=0.0)]

    if naive() != cached():
        raise SystemExit("KV-cache decode disagrees with the full-forward rollout")
    t_naive = timed(naive, device, max(1, args.iters // 4))
    t_cached = timed(cached, device, max(1, args.iters // 4))
    label = f"greedy decode {n} tok after {args.prompt_len}-tok prompt"
    return [
        (f"{label}: full recompute (baseline)", n / t_naive, n / t_naive, "tok/s"),
        (f"{label}: Engine + KV cache", n / t_cached, n / t_naive, "tok/s"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 1024 on CPU")
    p.add_argument("--window", type=int, default=None, help="default: the model's S window for T")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    # GPU defaults: one d24 layer (12 heads of 128) at T=2048, batch 8; CPU: a small slice of it.
    args.seq_len = args.seq_len or (2048 if gpu else 1024)
    args.heads = args.heads or (12 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.batch = args.batch or (8 if gpu else 1)
    args.window = args.window or GPTConfig(sequence_len=args.seq_len).short_window
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(0) if gpu else "cpu (1 thread)"
    print(
        f"device: {name}; attention B={args.batch} T={args.seq_len} H={args.heads} D={args.head_dim} "
        f"window={args.window} {str(dtype).replace('torch.', '')}; torch {torch.__version__}"
    )
    rows = attention_rows(args, device, dtype) + decode_rows(args, device)
    w = max(len(r[0]) for r in rows)
    print(f"| {'measurement':<{w}} | {'value':>10} | {'baseline':>10} | {'speedup':>7} | unit  |")
    print(f"|{'-' * (w + 2)}|{'-' * 12}|{'-' * 12}|{'-' * 9}|-------|")
    for label, value, base, unit in rows:
        if unit == "ms":
            value, base, speedup = value * 1e3, base * 1e3, base / value
        else:
            speedup = value / base
        print(f"| {label:<{w}} | {value:>10.2f} | {base:>10.2f} | {speedup:>6.2f}x | {unit:<5} |")


if __name__ == "__main__":
    main()
