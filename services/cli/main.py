"""`ncp`: the platform's command line.

Each module in `services/cli/commands/` contributes one sub-command group through a function
`register(subparsers)`, so the CLI grows one file per concept and nobody edits a central list.
Commands are thin: they parse arguments and call library functions in `shared/` or the API.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from services.cli import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncp", description="nanochat platform command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{mod_info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # Bad input is reported in one line naming the problem, not as a traceback.
        print(f"ncp: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
