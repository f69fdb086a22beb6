"""`ncp export` and `ncp serve` argument handling, through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from services.cli.main import build_parser, main
from shared.settings import get_settings


def test_ncp_export_and_publish(tiny_run, tmp_path, capsys):
    out = tmp_path / "exp"
    rc = main(["export", "--checkpoint", str(tiny_run["ckpt_dir"]), "--step", "3", "--tokenizer",
               str(tiny_run["tokenizer_dir"]), "--out", str(out), "--name", "chat-d4", "--publish"])  # fmt: skip
    assert rc == 0
    assert (out / "model.safetensors").is_file()
    current = json.loads((get_settings().serving_dir / "current.json").read_text())
    assert current["model"] == "chat-d4" and current["path"] == str(out.resolve())
    assert "exported to" in capsys.readouterr().out


def test_ncp_export_errors_are_one_line(tiny_run, tmp_path, capsys):
    rc = main(["export", "--checkpoint", str(tiny_run["ckpt_dir"]), "--tokenizer", str(tmp_path / "none"),
               "--out", str(tmp_path / "exp")])  # fmt: skip
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_ncp_serve_parses():
    args = build_parser().parse_args(["serve", "--engine", "native", "--port", "9001", "--model", "/x"])
    assert (args.engine, args.port, args.model) == ("native", 9001, "/x") and callable(args.func)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--engine", "tgi"])
