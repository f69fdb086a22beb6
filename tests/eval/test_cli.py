"""`ncp sft`, `ncp eval base|chat|report|fixtures` end to end on the tiny trained checkpoint."""

from __future__ import annotations

import json

from services.cli.main import main


def test_cli_sft_then_eval_then_report(trained_base, tmp_path, capsys):
    data, tok, base = trained_base
    run = tmp_path / "run"
    out = run / "chatsft_checkpoints" / "d2"
    cfg = tmp_path / "sft.json"
    cfg.write_text(
        json.dumps({"base_checkpoint_dir": str(base), "tokenizer_dir": str(tok), "out_dir": str(out)})
    )
    assert main(["sft", "--config", str(cfg), "--num-iterations", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step 1/3 loss") and json.loads(lines[-1])["checkpoint_step"] == 3

    assert (
        main(
            [
                "eval",
                "base",
                "--checkpoint",
                str(base),
                "--tokenizer",
                str(tok),
                "--data",
                str(data),
                "--out",
                str(run / "eval"),
                "--max-per-task",
                "2",
                "--device",
                "cpu",
                "--bpb-tokens",
                "1024",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 30 and res["val_bpb"] > 0 and len(res["tasks"]) == 6

    assert (
        main(
            [
                "eval",
                "chat",
                "--checkpoint",
                str(out),
                "--tokenizer",
                str(tok),
                "--out",
                str(run / "eval"),
                "--tasks",
                "ARC-Easy,GSM8K",
                "--max-per-task",
                "2",
                "--max-new-tokens",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res["tasks"]) == {"ARC-Easy", "GSM8K"} and res["chatcore_complete"] is False

    assert main(["eval", "report", str(run)]) == 0
    report = capsys.readouterr().out.strip()
    assert report.endswith("report.md") and "ChatCORE" in open(report).read()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sft", "--base", "b"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path / "nope")]) == 2
    assert "run_dir" in capsys.readouterr().err
    assert main(["eval", "fixtures", "--out", str(tmp_path / "fx")]) == 0
    assert (tmp_path / "fx" / "core_bundle" / "core.yaml").is_file()
