"""`ncp tokenizer train|eval`: train the BPE tokenizer on a shard folder, report its compression."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _datasets_dir() -> Path:
    from shared.settings import get_settings

    return get_settings().datasets_dir


def _val_report(tok, data_dir: Path, text_column: str, max_docs: int) -> dict:
    from itertools import islice

    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.tokenizer import compression_report

    _, val = split_shards(data_dir)
    return compression_report(tok, list(islice(iter_shard_texts(val, text_column), max_docs)))


def _train(args: argparse.Namespace) -> int:
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.tokenizer import train_tokenizer

    data = Path(args.data) if args.data else _datasets_dir() / "demo"
    out = Path(args.out) if args.out else _datasets_dir() / "tokenizer"
    train, _ = split_shards(data)
    t0 = time.perf_counter()
    tok = train_tokenizer(
        iter_shard_texts(train, args.text_column),
        vocab_size=args.vocab_size,
        out_dir=out,
        doc_cap=args.doc_cap,
        max_chars=args.max_chars,
    )
    seconds = time.perf_counter() - t0
    report = {"tokenizer_dir": str(out), "train_seconds": round(seconds, 3)}
    report.update(_val_report(tok, data, args.text_column, args.max_docs))
    print(json.dumps(report, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from shared.nanochat.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(args.tokenizer))
    print(json.dumps(_val_report(tok, Path(args.data), args.text_column, args.max_docs), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    tk = subparsers.add_parser("tokenizer", help="train / evaluate the BPE tokenizer")
    sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tk.set_defaults(func=lambda _a: (tk.print_help(), 2)[1])

    tr = sub.add_parser("train", help="train on the train shards, report bytes/token on validation")
    tr.add_argument("--data", help="shard folder (default: $NCP_HOME/datasets/demo)")
    tr.add_argument("--vocab-size", type=int, default=32768)
    tr.add_argument("--out", help="output folder (default: $NCP_HOME/datasets/tokenizer)")
    tr.add_argument("--max-chars", type=int, default=2_000_000_000, help="training budget in characters")
    tr.add_argument("--doc-cap", type=int, default=10_000, help="max characters per document")
    tr.add_argument("--text-column", default="text")
    tr.add_argument("--max-docs", type=int, default=1000, help="validation docs for the compression report")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="bytes per token of a tokenizer on a corpus' validation shard")
    ev.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    ev.add_argument("--data", required=True, help="shard folder")
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--max-docs", type=int, default=1000)
    ev.set_defaults(func=_eval)
