"""`ncp import nanochat DIR --name NAME [--json]`: bring an upstream nanochat run into the platform.

DIR is an upstream base dir (`~/.cache/nanochat`: tokenizer/, base_checkpoints/, chatsft_checkpoints/,
any subset). The model lands in `$NCP_HOME/models/NAME/` with a manifest.json saying what came
from where (shared/nanochat/nanochat_import.py); `--json` prints that manifest.

When the run registry is there (its database migrated by `ncp db upgrade`), the model is also
registered in it (shared/db/model_registry.py): a name the registry already holds is refused
before anything is written, and a registration that fails removes the imported folder again.

`--via-api` does the import on the platform instead, like `ncp jobs`: it asks the API
(NCP_API_URL, or --api-url) for an `import` job (POST /models/import), which a data worker runs.
DIR is then a path on the platform's side, under its data roots (absolute, or relative to a root),
checked by the API. Without --via-api the import runs here, in this process, as every other
`ncp` command that takes local files does (`ncp train`, `ncp export`, ...). `--wait` follows the
job and prints the manifest as the local import does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shared.settings import Settings

if TYPE_CHECKING:  # sqlalchemy is imported where the registry is used: `ncp` on a bare GPU box has none
    from sqlalchemy.orm import Session, sessionmaker


def registry_sessions(settings: Settings) -> sessionmaker[Session] | None:
    """Sessions of the model registry, or None when there is none: the default SQLite file does
    not exist yet, or the database was never migrated to a revision that has the `models` table.
    A configured database that does not answer is an error (the import would go unregistered)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from shared.db.session import is_sqlite, make_engine, make_session_factory

    url = settings.database_url
    assert url is not None  # Settings fills in the default
    if is_sqlite(url) and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            has_table = inspect(conn).has_table("models")
    except OperationalError as e:
        engine.dispose()
        raise ValueError(f"the run registry does not answer ({type(e).__name__}); nothing imported") from e
    if not has_table:
        engine.dispose()
        return None
    return make_session_factory(engine)


def _nanochat(args: argparse.Namespace) -> int:
    from shared.db import model_registry
    from shared.db.session import session_scope
    from shared.nanochat.nanochat_import import import_nanochat
    from shared.settings import get_settings

    settings = get_settings()
    sessions = registry_sessions(settings)
    if sessions is not None:
        with session_scope(sessions) as s:
            old = model_registry.get_model(s, model_registry.check_name(args.name))
        if old is not None:
            raise model_registry.ModelExists(args.name, f"{old.source} model at {old.path}")
    manifest = import_nanochat(args.dir, settings.models_dir, args.name)
    if sessions is not None:
        try:
            with session_scope(sessions) as s:
                model_registry.register_import(s, manifest)
        except BaseException:
            shutil.rmtree(manifest["path"], ignore_errors=True)
            raise
    else:
        print(
            "note: no migrated run registry (ncp db upgrade); the model was not registered", file=sys.stderr
        )
    return _print_manifest(manifest, args.json)


def _print_manifest(manifest: dict, as_json: bool) -> int:
    if as_json:
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


def _via_api(args: argparse.Namespace) -> int:
    from services.api.client import ApiClientError, JobsClient
    from services.cli.commands.jobs import follow
    from shared.settings import get_settings

    s = get_settings()
    with JobsClient(args.api_url or s.api_url or "", s.api_token) as client:
        try:
            job = client.import_model(args.dir, args.name, idempotency_key=args.idempotency_key)
            if not args.wait:
                if args.json:
                    print(json.dumps(job, indent=2))
                else:
                    print(f"import job {job['id']} queued: {args.dir} -> model {args.name!r}")
                    print(f"  follow it with: ncp jobs watch {job['id']}")
                return 0
            # Progress goes to stderr under --json, so stdout stays one JSON document.
            job = follow(client, job["id"], out=sys.stderr if args.json else None)
        except ApiClientError as e:
            print(f"ncp import: {e}", file=sys.stderr)
            return 1
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        print(f"ncp import: job {job['id']} {job['status']}: {err.get('message') or ''}", file=sys.stderr)
        return 1
    outputs = next(st["outputs"] for st in job["stages"] if st["name"] == "import")
    return _print_manifest(outputs["manifest"], args.json)


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
    api = nc.add_argument_group("through the API (an import job on the platform's workers)")
    api.add_argument(
        "--via-api",
        action="store_true",
        help="submit an import job (POST /models/import); DIR is the platform's",
    )
    api.add_argument("--api-url", help="API base URL (default: NCP_API_URL)")
    api.add_argument(
        "--wait", action="store_true", help="follow the job and print the manifest when it is done"
    )
    api.add_argument("--idempotency-key", help="repeating the command with the key returns the same job")
    nc.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.via_api:
        return _via_api(args)
    given = [f for f in ("api_url", "wait", "idempotency_key") if getattr(args, f)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag} applies to an import through the API: add --via-api")
    return _nanochat(args)
