"""`python -m services.inference.native --model EXPORT_DIR [--name N] [--host H] [--port P]`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from services.inference.native.app import create_app_from_export
    from shared.loopback import is_loopback
    from shared.settings import get_settings

    p = argparse.ArgumentParser(prog="python -m services.inference.native", allow_abbrev=False)
    p.add_argument("--model", required=True, help="export folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--name", default=None, help="served model name (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args(argv)
    # The key comes from the environment (NCP_INFERENCE_API_KEY), never the command line: a
    # command line is readable by every user of the machine.
    api_key = get_settings().inference_api_key
    if api_key is None and not is_loopback(args.host):
        print(f"refusing to serve on {args.host} without NCP_INFERENCE_API_KEY", file=sys.stderr)
        return 2
    app = create_app_from_export(
        Path(args.model), args.name, device=args.device, max_batch=args.max_batch, api_key=api_key
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
