"""`ncp import nanochat DIR --name NAME [--json]`: bring an upstream nanochat run into the platform.

DIR is an upstream base dir (`~/.cache/nanochat`: tokenizer/, base_checkpoints/, chatsft_checkpoints/,
any subset). The model lands in `$NCP_HOME/models/NAME/` with a manifest.json saying what came
from where (shared/nanochat/nanochat_import.py); `--json` prints that manifest.
"""

from __future__ import annotations

import argparse
import json


def _nanochat(args: argparse.Namespace) -> int:
    from shared.nanochat.nanochat_import import import_nanochat
    from shared.settings import get_settings

    manifest = import_nanochat(args.dir, get_settings().models_dir, args.name)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"imported {manifest['source']['path']} as model {manifest['name']!r} -> {manifest['path']}")
    tok = manifest["tokenizer"]
    if tok is not None:
        print(
            f"  tokenizer: {tok['path']}/ ({tok['vocab_size']} tokens, ids verified on {tok['verified_probes']} probes)"
        )
    for c in manifest["checkpoints"]:
        ranks = sorted(set(c["optimizer_ranks"].values()))
        optim = (
            f"optimizer shards of {'/'.join(map(str, ranks))} rank(s)" if any(ranks) else "no optimizer state"
        )
        print(f"  {c['phase']:<4} {c['path']}/: steps {c['steps']} ({optim})")
    for w in manifest["warnings"]:
        print(f"  warning: {w}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="import a model trained elsewhere (an upstream nanochat run)")
    sub = p.add_subparsers(dest="import_command", metavar="SOURCE", required=True)
    nc = sub.add_parser(
        "nanochat",
        help="a nanochat base dir (tokenizer.pkl, base/SFT checkpoints, optimizer shards; any subset)",
    )
    nc.add_argument("dir", help="the base dir, e.g. ~/.cache/nanochat")
    nc.add_argument("--name", required=True, help="model name in the platform (letters, digits, . _ -)")
    nc.add_argument("--json", action="store_true", help="print the manifest: where each part landed")
    nc.set_defaults(func=_nanochat)
