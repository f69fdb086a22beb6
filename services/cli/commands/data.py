"""`ncp data demo-corpus|fetch|import|validate`: build and check pretraining corpora (parquet shards)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _datasets_dir() -> Path:
    from shared.settings import get_settings

    return get_settings().datasets_dir


def _print_report(report) -> None:
    print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else report, indent=2))


def _demo(args: argparse.Namespace) -> int:
    from shared.nanochat.demo_corpus import write_demo_corpus

    out = Path(args.out) if args.out else _datasets_dir() / "demo"
    report = write_demo_corpus(out, num_shards=args.shards, seed=args.seed, max_bytes=args.max_bytes)
    _print_report(report)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from shared.nanochat import download

    if bool(args.repo) == bool(args.base_url):
        raise ValueError("give exactly one of --repo or --base-url")
    if args.repo:
        base = download.hf_base_url(args.repo, args.revision)
        val_index = args.val_index if args.val_index is not None else download.KNOWN_VAL_INDEX.get(args.repo)
        default_name = args.repo.split("/")[-1]
    else:
        base, val_index, default_name = args.base_url, args.val_index, "remote"
    # Without a known validation index, the last of the N fetched shards is the validation shard.
    indices = download.shard_indices(args.shards, val_index)
    out = Path(args.out) if args.out else _datasets_dir() / default_name
    cfg = download.DownloadConfig(workers=args.workers, retries=args.retries)
    try:
        paths = download.download_shards(download.shard_specs(base, indices, args.pattern), out, cfg)
    except download.DownloadError as e:
        raise ValueError(str(e)) from e
    print(f"{len(paths)} shard(s) in {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from shared.nanochat.corpus import import_local_corpus

    report = import_local_corpus(
        args.sources,
        Path(args.out),
        text_column=args.text_column,
        num_train_shards=args.train_shards,
        val_fraction=args.val_fraction,
    )
    _print_report(report)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from shared.nanochat.corpus import validate_corpus

    _print_report(
        validate_corpus(Path(args.dir), text_column=args.text_column, sample_shards=args.sample_shards)
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="pretraining corpora: demo, fetch, import, validate")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda _a: (data.print_help(), 2)[1])

    demo = sub.add_parser("demo-corpus", help="write the offline demo corpus (text shipped with Python)")
    demo.add_argument("--out", help="output directory (default: $NCP_HOME/datasets/demo)")
    demo.add_argument("--shards", type=int, default=4, help="number of shards, the last is validation")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-bytes", type=int, default=None, help="size budget (default ~4 MB)")
    demo.set_defaults(func=_demo)

    fetch = sub.add_parser("fetch", help="download parquet shards (Hugging Face dataset or any HTTPS URL)")
    fetch.add_argument("--repo", help="Hugging Face dataset repo, e.g. karpathy/climbmix-400b-shuffle")
    fetch.add_argument("--revision", default="main")
    fetch.add_argument("--base-url", help="base URL; files are BASE/PATTERN")
    fetch.add_argument("--pattern", default="shard_{index:05d}.parquet", help="remote file name pattern")
    fetch.add_argument("--shards", type=int, required=True, help="number of train shards")
    fetch.add_argument("--val-index", type=int, default=None, help="index of the validation shard")
    fetch.add_argument("--out", help="output directory (default: $NCP_HOME/datasets/<repo name>)")
    fetch.add_argument("--workers", type=int, default=4)
    fetch.add_argument("--retries", type=int, default=5)
    fetch.set_defaults(func=_fetch)

    imp = sub.add_parser("import", help="convert local parquet/JSONL/text files (or globs) into shards")
    imp.add_argument("sources", nargs="+")
    imp.add_argument("--out", required=True)
    imp.add_argument("--text-column", default="text", help="parquet column / JSON field with the text")
    imp.add_argument("--train-shards", type=int, default=4)
    imp.add_argument("--val-fraction", type=float, default=0.05)
    imp.set_defaults(func=_import)

    val = sub.add_parser("validate", help="count usable text in a shard folder; fails if there is none")
    val.add_argument("dir")
    val.add_argument("--text-column", default="text")
    val.add_argument("--sample-shards", type=int, default=None, help="read text of only N shards")
    val.set_defaults(func=_validate)
