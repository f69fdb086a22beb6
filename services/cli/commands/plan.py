"""`ncp plan`: what a training run of a given depth will cost, before any GPU is touched."""

from __future__ import annotations

import argparse
import json

from shared.nanochat.sizing import PEAK_FLOPS, plan

# Memory per accelerator (GB, vendor datasheets) for the "does it fit" line; keys as PEAK_FLOPS.
GPU_MEMORY_GB: dict[str, int | None] = {
    "b200": 192,
    "h200": 141,
    "h200-nvl": 141,
    "h100": 80,
    "h100-nvl": 94,
    "h100-pcie": 80,
    "a100": 80,
    "l40s": 48,
    "mi355x": 288,
    "mi325x": 256,
    "mi300x": 192,
    "mi300a": 128,
    "mi250x": 128,
    "cpu": None,
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="model size, FLOPs, batch, iterations and wall time for a depth",
        description="Print the derived training plan (reference auto-sizing) for a model depth.",
    )
    p.add_argument("--depth", type=int, required=True, help="number of layers (sets the model width)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per GPU per micro-step")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument(
        "--gpu",
        default="mi300x",
        type=str.lower,
        choices=list(PEAK_FLOPS),
        metavar="GPU",
        help=f"accelerator, one of {', '.join(PEAK_FLOPS)}",
    )
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (0-1]")
    p.add_argument("--target-param-data-ratio", type=float, default=12)
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: auto)")
    p.add_argument("--num-iterations", type=int, default=None)
    p.add_argument("--target-flops", type=float, default=None)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a (no peak FLOPs for this device)"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s"


def _run(args: argparse.Namespace) -> int:
    pl = plan(
        args.depth,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        device_batch_size=args.device_batch_size,
        gpus=args.gpus,
        gpu=args.gpu,
        target_param_data_ratio=args.target_param_data_ratio,
        total_batch_size=args.total_batch_size,
        num_iterations=args.num_iterations,
        target_flops=args.target_flops,
        mfu=args.mfu,
        window_pattern=args.window_pattern,
    )
    floor, capacity = memory_check(args)
    if args.json:
        print(
            json.dumps(
                {**pl.to_dict(), "memory_floor_bytes_per_gpu": floor, "gpu_memory_bytes": capacity}, indent=2
            )
        )
        return 0
    cfg = pl.model_config
    rows = [
        (
            "model",
            f"d{args.depth}: {cfg['n_layer']} layers, dim {cfg['n_embd']}, {cfg['n_head']} heads, "
            f"vocab {cfg['vocab_size']:,}, context {cfg['sequence_len']}, windows {cfg['window_pattern']}",
        ),
    ]
    rows += [(f"params {k}", f"{v:,}") for k, v in pl.param_breakdown.items()]
    rows += [
        ("scaling params", f"{pl.scaling_params:,}"),
        ("FLOPs / token", f"{pl.flops_per_token:,} ({pl.flops_per_token:.3e})"),
        ("total batch", f"{pl.total_batch_size:,} tokens{' (auto)' if pl.auto_batch_size else ''}"),
        ("grad accum", f"{pl.grad_accum_steps} x ({pl.device_batch_size} x {pl.seq_len} x {pl.gpus} GPU)"),
        ("LR scale", f"{pl.batch_lr_scale:.4f}"),
        ("weight decay", f"{pl.weight_decay:.6f}"),
        ("iterations", f"{pl.num_iterations:,} (from {pl.horizon_from})"),
        ("tokens", f"{pl.total_tokens:,} ({pl.tokens_param_ratio:.2f} per scaling param)"),
        ("total FLOPs", f"{pl.total_flops:.3e}"),
        ("device", f"{pl.gpus} x {pl.gpu}, peak {pl.peak_flops or 0:.4g} FLOP/s, assumed MFU {pl.mfu:.0%}"),
        ("est. throughput", f"{pl.est_tokens_per_sec:,.0f} tok/s" if pl.est_tokens_per_sec else "n/a"),
        ("est. wall time", _duration(pl.est_seconds)),
        ("memory / GPU", _memory_line(floor, capacity, args.gpu)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if capacity is not None and floor > capacity:
        print(
            f"cannot fit: d{args.depth} needs at least {floor / 1e9:.0f} GB per GPU before activations; "
            f"{args.gpu} has {capacity / 1e9:.0f} GB (use more GPUs, which shard the optimizer state, "
            "or a smaller depth)"
        )
    return 0


def memory_check(args: argparse.Namespace) -> tuple[int, int | None]:
    """(bytes per GPU for weights, gradients and sharded optimizer state, the GPU's memory)."""
    from pydantic import ValidationError

    from shared.jobs.spec import ModelSpec, training_memory_floor

    try:
        model = ModelSpec.model_validate(
            {"depth": args.depth, "vocab_size": args.vocab_size, "sequence_len": args.seq_len,
             "window_pattern": args.window_pattern},
        )  # fmt: skip
    except ValidationError as e:
        raise ValueError(str(e)) from None
    gb = GPU_MEMORY_GB.get(args.gpu)
    return training_memory_floor(model, args.gpus), None if gb is None else gb * 10**9


def _memory_line(floor: int, capacity: int | None, gpu: str) -> str:
    need = f"at least {floor / 1e9:.1f} GB (weights, gradients, optimizer state; activations on top)"
    if capacity is None:
        return need
    verdict = "fits" if floor <= capacity else "CANNOT FIT"
    return f"{need}; {gpu} has {capacity / 1e9:.0f} GB: {verdict}"
