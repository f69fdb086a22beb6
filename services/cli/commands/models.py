"""`ncp models list|show|serve`: the model registry through the API (imported and trained models).

`list` prints one line per model (name, source, lineage, vocabulary, newest base/SFT steps,
exports); `show NAME` everything the registry knows of one model; `serve NAME` makes it the
served model (POST /models/{name}/serve): at once when the checkpoint has an export, else through
the job the API submits to export it (its id is printed; `--wait` follows it like `ncp jobs watch`).
`--json` prints the API's answer as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.api.client import ApiClientError, JobsClient


def _client(args: argparse.Namespace) -> JobsClient:
    from shared.settings import get_settings

    s = get_settings()
    return JobsClient(args.api_url or s.api_url or "", s.api_token)


def _run(fn: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return int(fn(client, args) or 0)
        except ApiClientError as e:
            print(f"ncp models: {e}", file=sys.stderr)
            return 1

    return wrapped


def _lineage(m: dict[str, Any]) -> str:
    lin = m["lineage"]
    origin = (
        f"job {lin['source_job_id'][:8]}" if lin["source_job_id"] else (lin["source_path"] or lin["source"])
    )
    return f"{origin} <- {lin['parent_model']}" if lin["parent_model"] else origin


def _step(m: dict[str, Any], phase: str) -> str:
    s = m["latest_steps"].get(phase)
    return "-" if s is None else str(s)


def _list(client: JobsClient, args: argparse.Namespace) -> int:
    page = client.list_models()
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    if not page["data"]:
        print("no models yet: train one (ncp jobs submit) or import one (ncp import nanochat)")
        return 0
    print(
        f"{'NAME':24}  {'SOURCE':6}  {'VOCAB':>6}  {'BASE':>7}  {'SFT':>7}  {'EXPORTS':>7}  {'CREATED':19}  LINEAGE"
    )
    for m in page["data"]:
        vocab = str(m["vocab_size"]) if m["vocab_size"] is not None else "-"
        print(
            f"{m['name']:24}  {m['lineage']['source']:6}  {vocab:>6}  {_step(m, 'base'):>7}  {_step(m, 'sft'):>7}  "
            f"{m['export_count']:>7}  {m['created_at'][:19]:19}  {_lineage(m)}"
        )
    return 0


def _show(client: JobsClient, args: argparse.Namespace) -> int:
    m = client.get_model(args.name)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    lin = m["lineage"]
    print(f"model {m['name']} ({lin['source']}, created {m['created_at'][:19]})")
    print(f"  path:       {m['path']}")
    if lin["source_job_id"]:
        print(f"  trained by: job {lin['source_job_id']}")
    if lin["source_path"]:
        print(f"  imported:   from {lin['source_path']}")
    if lin["parent_model"]:
        print(f"  parent:     {lin['parent_model']}")
    vocab = m["vocab_size"] if m["vocab_size"] is not None else "?"
    tok = m["tokenizer_path"] or "none (cannot be served or fine-tuned until it has one)"
    print(f"  tokenizer:  {tok}  (model vocab {vocab})")
    print(f"  tag:        {m['checkpoint_tag'] or '-'}")
    if not m["checkpoints"]:
        print("  checkpoints: none")
    for c in m["checkpoints"]:
        optim = (
            f"optimizer state of {c['optimizer_world_size']} rank(s)"
            if c["has_optimizer"]
            else "weights only"
        )
        print(f"  {c['phase']:<4} step {c['step']:>7}  {optim:28}  {c['path']}")
    for e in m["exports"]:
        of = f"{e['phase']} step {e['step']}" if e["phase"] else "checkpoint unknown"
        print(f"  export ({e['format']}, {of}): {e['path']}")
    return 0


def _serve(client: JobsClient, args: argparse.Namespace) -> int:
    r = client.serve_model(args.name, args.phase, args.step)
    if args.json:
        print(json.dumps(r, indent=2))
    if "job" not in r:  # 200: the checkpoint had an export, published now
        if not args.json:
            print(f"serving {r['model']} ({r['phase']} step {r['step']}) from {r['export_dir']}")
        return 0
    # 202: no export of that checkpoint yet; a job exports it, then serves it
    job = r["job"]
    if not args.json:
        print(
            f"exporting {r['model']} ({r['phase']} step {r['step']}) first: job {job['id']} "
            f"(stages: {', '.join(s['name'] for s in job['stages'])}); "
            + ("following it" if args.wait else f"follow it with `ncp jobs watch {job['id']}`")
        )
    if not args.wait:
        return 0
    from services.cli.commands.jobs import follow

    # Progress goes to stderr with --json, so stdout stays the API's answer alone.
    done = follow(client, job["id"], out=sys.stderr if args.json else None)
    if done["status"] != "succeeded":
        err = done.get("error") or {}
        print(
            f"ncp models: job {job['id']} {done['status']}: {err.get('message') or 'see ncp jobs status'}",
            file=sys.stderr,
        )
        return 1
    if not args.json:
        print(f"serving {r['model']} ({r['phase']} step {r['step']})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="imported and trained models (the model registry)")
    p.add_argument("--api-url", help="API base URL (default: NCP_API_URL)")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])

    ls = sub.add_parser("list", help="list models, newest first")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_run(_list))

    sh = sub.add_parser("show", help="one model: lineage, tokenizer, checkpoints, exports")
    sh.add_argument("name")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=_run(_show))

    sv = sub.add_parser(
        "serve", help="make this model the served one (its recorded export; else a job exports it first)"
    )
    sv.add_argument("name")
    sv.add_argument("--phase", choices=["base", "sft", "rl"], help="default: sft when the model has it")
    sv.add_argument("--step", type=int, help="default: the newest checkpoint of the phase")
    sv.add_argument("--json", action="store_true")
    sv.add_argument(
        "--wait", action="store_true", help="when a job has to export it first, follow that job to the end"
    )
    sv.set_defaults(func=_run(_serve))
