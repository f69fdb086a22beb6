"""`ncp` papercuts: whole option names only, a closed pipe is not a traceback, `plan` refuses unknown
accelerators and says when a model cannot fit one."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from services.cli.main import build_parser
from services.cli.main import main as ncp
from tests.processes import REPO


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_no_command_accepts_abbreviated_options(capsys):
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 20 and all(p.allow_abbrev is False for p in parsers)
    with pytest.raises(SystemExit) as e:
        ncp(["jobs", "submit", "--preset", "demo", "--num-iter", "5"])
    assert e.value.code == 2 and "unrecognized arguments: --num-iter" in capsys.readouterr().err


def test_closed_pipe_is_not_a_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "plan", "--depth", "12", "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes (as `| head` after its lines)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_plan_refuses_unknown_gpus_and_says_what_does_not_fit(capsys):
    with pytest.raises(SystemExit) as e:
        ncp(["plan", "--depth", "20", "--gpu", "h1000"])  # not h100
    assert e.value.code == 2 and "invalid choice: 'h1000'" in capsys.readouterr().err

    assert ncp(["plan", "--depth", "12", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "h100 has 80 GB: fits" in out and "cannot fit" not in out

    assert ncp(["plan", "--depth", "60", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "CANNOT FIT" in out and "cannot fit: d60 needs at least" in out

    # Eight GPUs shard the optimizer state: the floor per GPU drops.
    assert ncp(["plan", "--depth", "60", "--gpu", "mi300x", "--gpus", "8", "--json"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert ncp(["plan", "--depth", "60", "--gpu", "mi300x", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert eight["memory_floor_bytes_per_gpu"] < one["memory_floor_bytes_per_gpu"]
    assert one["gpu_memory_bytes"] == 192 * 10**9


def test_gpu_memory_table_covers_every_gpu():
    from services.cli.commands.plan import GPU_MEMORY_GB
    from shared.nanochat.sizing import PEAK_FLOPS

    assert set(GPU_MEMORY_GB) == set(PEAK_FLOPS)
