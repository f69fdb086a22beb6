"""`ncp train`: pretrain locally in this process, from a JSON config and/or flags, printing progress.

The common TrainConfig fields have flags (`--depth 4`, `--num-iterations 100`); any field can be
set with `--set FIELD=VALUE` (`--set compile=false`). Flags override the JSON config. torch is
imported only when the command runs, so `ncp` stays light for the other commands. The first Ctrl-C
saves a checkpoint and stops; a second one aborts. The first progress line is preceded by the
kernel report (attention kernels, compile, dtype, FP8, device) and a WARNING line per slow
fallback. `--progress-file` also appends every record as a JSON line, in the training child's
progress.jsonl format, for scripts (bench/gpu_check.py compares resumed losses with it).
For multi-GPU runs use torchrun with `python -m services.train_worker.entry pretrain`.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# Flags for the fields people set most; everything else goes through --set.
COMMON_FIELDS = (
    ("data_dir", "--data", str),
    ("tokenizer_dir", "--tokenizer", str),
    ("checkpoint_dir", "--checkpoint-dir", str),
    ("depth", "--depth", int),
    ("num_iterations", "--num-iterations", int),
    ("device_batch_size", "--device-batch-size", int),
    ("total_batch_size", "--total-batch-size", int),
    ("max_seq_len", "--max-seq-len", int),
    ("eval_every", "--eval-every", int),
    ("save_every", "--save-every", int),
    ("device", "--device", str),
)


def _value(text: str):
    """Flag text -> JSON value when it parses (numbers, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _print_kernels(k: dict) -> None:
    attention = ", ".join(f"{kind} {name}" for kind, name in sorted(k["attention"].items()))
    fp8 = f"fp8 {k['fp8_formats']} ({k['fp8_layers']} layers)" if k["fp8"] else "fp8 off"
    peak = f"peak {k['peak_flops']:.4g} FLOP/s" if k["peak_flops"] else "no peak FLOP/s (no MFU)"
    compiled = "compiled" if k["compiled"] else "eager"
    print(
        f"kernels: {k['device']} | attention {attention} | {compiled} | {k['compute_dtype']} | {fp8} | {peak}"
    )
    for cause in k["slow_fallbacks"]:
        print(f"WARNING: slow fallback: {cause}", flush=True)


def _print_progress(d: dict) -> None:
    if "kernels" in d:
        _print_kernels(d["kernels"])
    mfu = f"{100 * d['mfu']:.1f}%" if d.get("mfu") is not None else "-"
    print(
        f"step {d['step']:>6}/{d['total_steps']} | loss {d['loss']:.4f} (raw {d['raw_loss']:.4f}) | "
        f"lrm {d['lr_mult']:.3f} | {d['tokens_per_sec']:,.0f} tok/s | mfu {mfu} | "
        f"mem {d['peak_memory_bytes'] / 2**30:.2f} GiB | eta {_fmt_eta(d.get('eta_seconds'))}",
        flush=True,
    )


def _run(args: argparse.Namespace) -> int:
    from shared.nanochat.train import TrainConfig, TrainHooks, train
    from shared.settings import get_settings

    cfg_dict: dict = {}
    if args.config:
        try:
            cfg_dict = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config {args.config}: {e}") from e
    for name, _, _ in COMMON_FIELDS:
        v = getattr(args, f"cfg_{name}")
        if v is not None:
            cfg_dict[name] = v
    if args.fp8:
        cfg_dict["fp8"] = True
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set needs FIELD=VALUE, got {item!r}")
        cfg_dict[key.strip()] = _value(text)
    cfg = TrainConfig.from_dict(cfg_dict)

    if get_settings().rocm_env_defaults:
        from shared.nanochat.device import apply_env_defaults

        apply_env_defaults()

    stop = {"requested": False}
    jsonl: TextIO | None = None
    if args.progress_file:
        Path(args.progress_file).parent.mkdir(parents=True, exist_ok=True)
        jsonl = open(args.progress_file, "a", encoding="utf-8")  # noqa: SIM115 - closed below

    def record(kind: str, show: Callable[[dict], None]) -> Callable[[dict], None]:
        def hook(d: dict) -> None:
            if jsonl is not None:
                jsonl.write(json.dumps({"type": kind, "time": time.time(), **d}, default=str) + "\n")
                jsonl.flush()
            show(d)

        return hook

    def on_sigint(signum, frame):  # noqa: ARG001
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("stopping: saving a checkpoint (Ctrl-C again to abort)", flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(
            cfg,
            TrainHooks(
                on_progress=record("progress", _print_progress),
                on_eval=record(
                    "eval", lambda d: print(f"step {d['step']:>6} | val bpb {d['val_bpb']:.4f}", flush=True)
                ),
                on_checkpoint=record(
                    "checkpoint", lambda d: print(f"step {d['step']:>6} | checkpoint {d['path']}", flush=True)
                ),
                should_stop=lambda: stop["requested"],
            ),
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        if jsonl is not None:
            jsonl.close()
    state = "stopped" if result.stopped else "finished"
    bpb = f"{result.val_bpb:.4f}" if result.val_bpb is not None else "-"
    print(
        f"{state} at step {result.step}/{result.total_steps}; val bpb {bpb}; checkpoint step {result.checkpoint_step}"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model in this process (CPU or one GPU)")
    p.add_argument("--config", help="JSON file with TrainConfig fields (flags override it)")
    for name, flag, typ in COMMON_FIELDS:
        p.add_argument(
            flag, dest=f"cfg_{name}", type=typ, default=None, metavar=name.upper(), help=f"TrainConfig.{name}"
        )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="train the transformer matrices in FP8 (TrainConfig.fp8; needs an FP8 GPU or torch's CPU GEMM)",
    )
    p.add_argument("--progress-file", metavar="PATH", help="also append every record to PATH as JSON lines")
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any TrainConfig field; VALUE is parsed as JSON when it can be (repeatable)",
    )
    p.set_defaults(func=_run)
