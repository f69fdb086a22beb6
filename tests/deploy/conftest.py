"""Shared checks for the deployment tests: does a process command exist, is an env key a setting."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def setting_env_names() -> set[str]:
    from shared.settings import Settings

    return {f"NCP_{name.upper()}" for name in Settings.model_fields}


def check_command(argv: list[str]) -> None:
    """Fail unless `argv` (a compose/Helm/Dockerfile command) runs something our package has."""
    assert argv, "empty command"
    prog, args = argv[0], argv[1:]
    if prog == "ncp":
        from services.cli.main import build_parser

        try:
            ns = build_parser().parse_args(args)
        except SystemExit as e:  # argparse exits on an unknown sub-command or option
            raise AssertionError(f"`{' '.join(argv)}` is not a valid ncp command") from e
        assert getattr(ns, "func", None), f"`{' '.join(argv)}` names no runnable ncp sub-command"
    elif prog == "uvicorn":
        target = args[0]
        module, _, attr = target.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), f"{target} is not callable"
        assert "--factory" in args, f"{target} is an app factory: uvicorn needs --factory"
    elif prog in ("python", "python3") and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"module {args[1]} does not exist"
    elif prog in ("torchrun",):
        i = args.index("-m")
        assert importlib.util.find_spec(args[i + 1]) is not None, f"module {args[i + 1]} does not exist"
    elif prog in ("redis-server", "sh", "celery"):
        pass  # vendor images' own programs and healthcheck shells
    else:
        raise AssertionError(f"unknown program in command {argv}")


@pytest.fixture
def command_checker():
    return check_command


@pytest.fixture
def settings_env():
    return setting_env_names()
