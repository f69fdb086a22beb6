"""`ncp`: the platform's command line.

Each module in `services/cli/commands/` contributes one sub-command group through a function
`register(subparsers)`, so the CLI grows one file per concept and nobody edits a central list.
Commands are thin: they parse arguments and call library functions in `shared/` or the API.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from services.cli import commands


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command takes only whole option names: with argparse's default, `--num-iter`
    silently meant `--num-iterations`, and a later option starting the same way would change the
    meaning of existing scripts."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncp", description="nanochat platform command line", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{mod_info.name}")
        module.register(sub)
    _no_abbreviations(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ncp jobs list | head`): stop quietly. Later writes (the
        # interpreter's final flush) go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, FileNotFoundError) as e:
        # Bad input is reported in one line naming the problem, not as a traceback.
        print(f"ncp: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
