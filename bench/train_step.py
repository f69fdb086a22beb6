"""Training-step throughput (tokens/s) and MFU on this machine's device, per attention backend.

    python bench/train_step.py --depth 24 --device-batch-size 32 --seq-len 2048 --fp8  # one GPU
    python bench/train_step.py --depth 2 --device-batch-size 4 --seq-len 256 --vocab 4096  # CPU smoke

One step = forward + backward of `--grad-accum` micro-batches of random tokens + the MuonAdamW
step, exactly as the trainer does it (compiled on GPU unless --no-compile). The chosen backend
("auto": FA3 / flash / FlexAttention / SDPA per device) is measured against the math-SDPA
baseline (attn_backend="math") in the same run, and the ratio is printed; `--fp8` adds the chosen
backend with FP8 matmuls (fp8.py). `--fit-batch` halves a run's device batch until it fits in
memory (the fp32 math baseline needs far more than the fused kernels); tokens/s and MFU compare
across batch sizes. `--json PATH` writes the rows for bench/gpu_check.py. For comparison, the seed
document's d24 run on one MI300X (reference code, SDPA) reached 27.5% MFU / 68K tok/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.nanochat import sizing  # noqa: E402
from shared.nanochat.config import GPTConfig  # noqa: E402
from shared.nanochat.device import apply_env_defaults, choose_dtype, detect_device  # noqa: E402
from shared.nanochat.fp8 import enable_fp8  # noqa: E402
from shared.nanochat.gpt import GPT  # noqa: E402
from shared.nanochat.kernel_report import kernel_report  # noqa: E402
from shared.nanochat.optim import MuonAdamW, OptimizerConfig, build_param_groups  # noqa: E402

SEED_REFERENCE: dict[str, Any] = {"device": "mi300x", "depth": 24, "mfu": 0.275, "tokens_per_sec": 68_000}


def measure(cfg: GPTConfig, backend: str, args, dev, dtype, *, fp8: bool = False, batch: int) -> dict:
    device = torch.device(dev.type)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg, attn_backend=backend, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    if fp8:
        enable_fp8(model, device)
    use_compile = (dev.type == "cuda") if args.compile is None else args.compile
    kernels = kernel_report(model, dev, device, dtype, compiled=use_compile)
    step_model = torch.compile(model, dynamic=False) if use_compile else model
    opt = MuonAdamW(
        build_param_groups(model, OptimizerConfig()),
        ortho_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
        compile_kernels=use_compile,
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = [torch.randint(0, cfg.vocab_size, (batch, cfg.sequence_len + 1), generator=gen) for _ in range(4)]
    batches = [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device)) for b in rows]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        for k in range(args.grad_accum):
            x, y = batches[(i * args.grad_accum + k) % len(batches)]
            (step_model(x, y) / args.grad_accum).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = batch * cfg.sequence_len * args.grad_accum
    dt = statistics.median(times)
    tok_s = tokens / dt
    mfu = sizing.mfu(sizing.flops_per_token(cfg), tok_s, dev.peak_flops)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {
        "backend": backend + (" fp8" if fp8 else ""),
        "resolved": "+".join(f"{kind}:{name}" for kind, name in sorted(kernels["attention"].items())),
        "batch": batch,
        "step_s": dt,
        "tok_s": tok_s,
        "tflops": sizing.flops_per_token(cfg) * tok_s / 1e12,
        "mfu": mfu,
        "peak_mem": mem,
        "compiled": use_compile,
        "fp8_formats": kernels["fp8_formats"],
        "slow_fallbacks": kernels["slow_fallbacks"],
    }


def measure_fitting(cfg: GPTConfig, backend: str, args, dev, dtype, *, fp8: bool = False, batch: int) -> dict:
    """measure() at `batch`, halving it on out-of-memory with --fit-batch."""
    while True:
        try:
            return measure(cfg, backend, args, dev, dtype, fp8=fp8, batch=batch)
        except torch.OutOfMemoryError:
            if not args.fit_batch or batch == 1:
                raise
            batch //= 2
        finally:
            torch._dynamo.reset()  # each model compiles afresh; no stale graphs hold memory
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", help="backend under test (auto = what training uses)")
    p.add_argument("--baseline", default="math", help="reference backend; 'none' to skip")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--fp8", action="store_true", help="also measure the backend under test with FP8 matmuls")
    p.add_argument("--fit-batch", action="store_true", help="halve a run's batch until it fits in memory")
    p.add_argument("--json", metavar="PATH", help="write the measured rows as JSON")
    p.add_argument("--baseline-batch", type=int, default=0, help="the baseline's device batch (0 = the same)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_env_defaults()
    dev = detect_device("auto")
    dtype = choose_dtype(dev.type)
    cfg = GPTConfig.from_depth(
        args.depth,
        vocab_size=args.vocab,
        sequence_len=args.seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        window_pattern=args.window_pattern,
    )
    peak = f"{dev.peak_flops:.4g} FLOP/s" if dev.peak_flops else "unknown, no MFU"
    print(f"device: {dev.name} ({dev.backend}, peak {peak}) dtype {dtype} torch {torch.__version__}")
    print(
        f"model: depth {args.depth}, dim {cfg.n_embd}, heads {cfg.n_head}x{cfg.head_dim}, vocab {cfg.vocab_size}, "
        f"T {cfg.sequence_len}, windows {args.window_pattern}; {sizing.num_scaling_params(cfg):,} scaling params, "
        f"{sizing.flops_per_token(cfg):.3e} FLOPs/token"
    )
    print(
        f"step: {args.device_batch_size} x {args.seq_len} x {args.grad_accum} accum = "
        f"{args.device_batch_size * args.seq_len * args.grad_accum:,} tokens; median of {args.steps} after {args.warmup} warmup"
    )
    plan = [(args.backend, False, args.device_batch_size)]
    if args.fp8:
        plan.append((args.backend, True, args.device_batch_size))
    if args.baseline != "none" and args.baseline != args.backend:
        plan.append((args.baseline, False, args.baseline_batch or args.device_batch_size))
    runs: list[dict] = []
    for backend, fp8, batch in plan:
        runs.append(measure_fitting(cfg, backend, args, dev, dtype, fp8=fp8, batch=batch))
        if args.json:  # after every run: a caller that times out still gets the finished ones
            payload = {"device": dev.name, "dtype": str(dtype), "runs": runs}
            Path(args.json).write_text(json.dumps(payload, indent=1))
    base = runs[-1]
    print()
    print(
        f"| {'backend':<9} | {'kernels':<24} | {'batch':>5} | {'step ms':>9} | {'tok/s':>11} | {'TFLOP/s':>8} | {'MFU':>6} | {'peak mem':>9} | {'tok/s vs ' + base['backend']:>14} |"
    )
    print(
        f"|{'-' * 11}|{'-' * 26}|{'-' * 7}|{'-' * 11}|{'-' * 13}|{'-' * 10}|{'-' * 8}|{'-' * 11}|{'-' * 16}|"
    )
    for r in runs:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem'] / 2**30:.1f}G" if r["peak_mem"] is not None else "n/a"
        print(
            f"| {r['backend']:<9} | {r['resolved']:<24} | {r['batch']:>5} | {1000 * r['step_s']:>9.1f} | {r['tok_s']:>11,.0f} | "
            f"{r['tflops']:>8.4f} | {mfu:>6} | {mem:>9} | {r['tok_s'] / base['tok_s']:>13.2f}x |"
        )
        for cause in r["slow_fallbacks"]:
            print(f"  slow fallback ({r['backend']}): {cause}")
    ref = SEED_REFERENCE
    print(
        f"\nseed reference: d{ref['depth']} on one {ref['device']} (reference code, SDPA): "
        f"{100 * ref['mfu']:.1f}% MFU, {ref['tokens_per_sec']:,} tok/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
