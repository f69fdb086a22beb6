"""`ncp sft --config CFG.json | flags`: supervised fine-tuning of a base checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# flag -> SFTConfig field for the options a person types most
_FLAGS = {
    "base": "base_checkpoint_dir",
    "base_step": "base_step",
    "tokenizer": "tokenizer_dir",
    "out": "out_dir",
    "mixture": "mixture",
    "tasks_dir": "tasks_dir",
    "num_iterations": "num_iterations",
    "device_batch_size": "device_batch_size",
    "max_seq_len": "max_seq_len",
    "grad_accum_steps": "grad_accum_steps",
    "matrix_lr": "matrix_lr",
    "embedding_lr": "embedding_lr",
    "unembedding_lr": "unembedding_lr",
    "init_lr_frac": "init_lr_frac",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "device": "device",
    "seed": "seed",
}


def _run(args: argparse.Namespace) -> int:
    from shared.nanochat.sft import SFTConfig, sft
    from shared.nanochat.train import TrainHooks

    d: dict = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    if not isinstance(d, dict):
        raise ValueError(f"{args.config}: expected a JSON object of SFTConfig fields")
    for flag, name in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            d[name] = value
    if args.conversations:
        d["conversations"] = list(d.get("conversations", [])) + args.conversations
    if args.no_load_optimizer:
        d["load_optimizer"] = False
    try:
        cfg = SFTConfig.from_dict(d)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"SFT config: {e}") from None

    def progress(p: dict) -> None:
        print(
            f"step {p['step']}/{p['total_steps']} loss {p['loss']:.4f} lrm {p['lr_mult']:.2f} "
            f"tok/s {p['tokens_per_sec']:.0f}",
            flush=True,
        )

    hooks = TrainHooks(
        on_progress=progress,
        on_eval=lambda e: print(f"step {e['step']} val bpb {e['val_bpb']:.4f}", flush=True),
        on_checkpoint=lambda c: print(f"checkpoint {c['path']}", flush=True),
    )
    result = sft(cfg, hooks)
    print(
        json.dumps(
            {
                "step": result.step,
                "last_loss": result.last_loss,
                "val_bpb": result.val_bpb,
                "checkpoint_step": result.checkpoint_step,
                "stopped": result.stopped,
            }
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning: base checkpoint -> chat checkpoint")
    p.add_argument("--config", help="JSON file of SFTConfig fields; flags override it")
    p.add_argument("--base", help="base checkpoint folder, e.g. RUN/base_checkpoints/d12")
    p.add_argument("--base-step", type=int, help="base step (default: newest complete)")
    p.add_argument("--tokenizer", help="tokenizer folder")
    p.add_argument("--out", help="output folder, e.g. RUN/chatsft_checkpoints/d12")
    p.add_argument(
        "--mixture",
        choices=["default", "demo", "jsonl"],
        help="default: SmolTalk + MMLU x3 + GSM8K x4 from --tasks-dir; demo: generated; jsonl: --conversations",
    )
    p.add_argument("--tasks-dir", help="local dataset folder in the Hub layout (default mixture)")
    p.add_argument("--conversations", action="append", help="JSONL conversations file (repeatable)")
    p.add_argument("--num-iterations", type=int, help="steps (-1 = one epoch)")
    p.add_argument("--device-batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--grad-accum-steps", type=int)
    p.add_argument("--matrix-lr", type=float)
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--unembedding-lr", type=float)
    p.add_argument("--init-lr-frac", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--no-load-optimizer", action="store_true", help="start from fresh optimizer momenta")
    p.add_argument("--device", help="auto|cuda|rocm|mps|cpu")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_run)
