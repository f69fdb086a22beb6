"""`ncp serve`: run the model server (vLLM with our plugin, or the native server) and keep it up."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from services.inference.serve import main

    argv = []
    for flag, value in (("--engine", args.engine), ("--host", args.host), ("--port", args.port),
                        ("--model", args.model), ("--name", args.name), ("--dtype", args.dtype),
                        ("--max-model-len", args.max_model_len)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return main(argv)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI API (default: whatever serving/current.json points to)"
    )
    p.add_argument("--model", default=None, help="export folder to serve (default: the published model)")
    p.add_argument("--name", default=None, help="served model name with --model")
    p.add_argument(
        "--engine", choices=["auto", "vllm", "native"], default=None, help="default: NCP_INFERENCE_ENGINE"
    )
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--dtype", default=None, help="vLLM dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(func=_serve)
