"""`ncp checkpoint list|import|prune`: inspect checkpoint dirs, import reference nanochat ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _list(args: argparse.Namespace) -> int:
    from shared.nanochat.checkpoint import list_checkpoints

    d = Path(args.dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint dir {d} does not exist")
    infos = list_checkpoints(d)
    if args.json:
        rows = [
            {
                "step": i.step,
                "complete": i.complete,
                "problem": i.problem,
                "size_bytes": i.size_bytes,
                "val_bpb": (i.meta or {}).get("val_bpb"),
                "kind": (i.meta or {}).get("kind"),
            }
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not infos:
        print(f"no checkpoints in {d}")
        return 0
    print(f"{'step':>8}  {'status':<10}  {'size':>10}  {'val_bpb':>8}  note")
    for i in infos:
        bpb = (i.meta or {}).get("val_bpb")
        bpb_s = f"{bpb:.4f}" if isinstance(bpb, (int, float)) else "-"
        status = "complete" if i.complete else "incomplete"
        print(f"{i.step:>8}  {status:<10}  {i.size_bytes / 2**20:>8.1f}MB  {bpb_s:>8}  {i.problem or ''}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from shared.nanochat.checkpoint import import_reference

    steps = import_reference(Path(args.src), Path(args.dst), step=args.step)
    for s in steps:
        print(f"imported step {s} -> {args.dst}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from shared.nanochat.checkpoint import apply_retention

    removed = apply_retention(Path(args.dir), args.keep_last, args.milestone_every)
    print(f"removed steps: {removed}" if removed else "nothing to remove")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoint", help="list, import or prune model checkpoints")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="steps in a checkpoint dir, complete or not")
    ls.add_argument("dir")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    imp = sub.add_parser("import", help="import a reference nanochat checkpoint dir (validated)")
    imp.add_argument("src", help="e.g. ~/.cache/nanochat/base_checkpoints/d24")
    imp.add_argument("dst", help="destination checkpoint dir")
    imp.add_argument("--step", type=int, default=None, help="only this step (default: all)")
    imp.set_defaults(func=_import)

    pr = sub.add_parser("prune", help="apply retention: keep the newest N (+ milestones)")
    pr.add_argument("dir")
    pr.add_argument("--keep-last", type=int, required=True)
    pr.add_argument("--milestone-every", type=int, default=0)
    pr.set_defaults(func=_prune)
