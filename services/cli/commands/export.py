"""`ncp export`: checkpoint -> Hugging-Face-style folder that vLLM and the native server load."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from services.inference.publish import publish_model
    from shared.nanochat.export import export_model

    out = export_model(
        Path(args.checkpoint),
        args.step,
        Path(args.tokenizer),
        Path(args.out),
        served_name=args.name,
        dtype=args.dtype,
    )
    print(f"exported to {out}")
    if args.publish:
        from shared.settings import get_settings

        record = publish_model(get_settings().serving_dir, args.name or out.name, out)
        print(json.dumps(record))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint for serving (config.json, safetensors, tokenizer)"
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, e.g. runs/<id>/chatsft_checkpoints/d12"
    )
    p.add_argument("--step", type=int, default=None, help="step to export (default: newest complete)")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json + tokenizer_config.json")
    p.add_argument("--out", required=True, help="export folder (replaced atomically)")
    p.add_argument("--name", default=None, help="served model name (default: the folder name)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="serving dtype written to config.json")  # fmt: skip
    p.add_argument(
        "--publish", action="store_true", help="also make it the served model (serving/current.json)"
    )
    p.set_defaults(func=_export)
