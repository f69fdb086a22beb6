"""`ncp db upgrade|current`: run-registry migrations (a separate step before the API starts)."""

from __future__ import annotations

import argparse


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    from shared.settings import get_settings

    url = get_settings().database_url
    assert url is not None
    return url


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _upgrade(args: argparse.Namespace) -> int:
    from services.api.migrate import current_revision, upgrade

    url = _url(args)
    upgrade(url, args.revision)
    print(f"registry at {_redact(url)} is at revision {current_revision(url)}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from services.api.migrate import current_revision

    url = _url(args)
    print(f"{_redact(url)}: {current_revision(url) or '(empty: run `ncp db upgrade`)'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    db = subparsers.add_parser("db", help="run-registry migrations")
    sub = db.add_subparsers(dest="db_command", metavar="ACTION")
    db.set_defaults(func=lambda _a: (db.print_help(), 2)[1])

    up = sub.add_parser("upgrade", help="apply Alembic migrations (default: up to head)")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--url", help="database URL (default: NCP_DATABASE_URL / SQLite under NCP_HOME)")
    up.set_defaults(func=_upgrade)

    cur = sub.add_parser("current", help="show the registry's migration revision")
    cur.add_argument("--url", help="database URL (default: NCP_DATABASE_URL)")
    cur.set_defaults(func=_current)
