"""run_base_eval / run_chat_eval on a tiny really-trained checkpoint, then the report from them."""

from __future__ import annotations

import json
import math

import pytest

from shared.nanochat.eval.report import write_report
from shared.nanochat.eval.runner import BASE_PROMPTS, run_base_eval, run_chat_eval
from shared.nanochat.eval.tasks import CHAT_TASKS


def test_base_then_chat_eval_then_report(trained_base, tmp_path):
    data, tok, ckpt = trained_base
    run = tmp_path / "run"
    res = run_base_eval(ckpt, None, tok, data, run / "eval", max_per_task=4, device="cpu", bpb_tokens=4096)
    assert res["step"] == 30 and res["kind"] == "base"
    # a 30-step model is far from perfect but far better than uniform over 512 tokens (~9 bits/token)
    assert 0.5 < res["val_bpb"] < 6.0
    core = res["core"]
    assert core["failed"] == {} and len(core["results"]) == 6 and math.isfinite(core["core"])
    assert [s["prompt"] for s in res["samples"]] == list(BASE_PROMPTS)
    assert all(isinstance(s["completion"], str) and s["completion"] for s in res["samples"])
    on_disk = json.loads((run / "eval" / "base_eval_000030.json").read_text())
    assert on_disk["val_bpb"] == res["val_bpb"] and on_disk["core"]["core"] == core["core"]

    chat = run_chat_eval(ckpt, 30, tok, run / "eval", max_per_task=2, device="cpu", max_new_tokens=24)
    assert set(chat["tasks"]) == set(CHAT_TASKS) and chat["failed"] == {}
    assert all(t["n"] == 2 and 0.0 <= t["accuracy"] <= 1.0 for t in chat["tasks"].values())
    assert math.isfinite(chat["chatcore"]) and chat["chatcore_complete"] is True
    assert len(chat["samples"]) == 3
    # a missing task folder fails only that task
    partial = run_chat_eval(
        ckpt, 30, tok, tmp_path / "other", tasks_dir=tmp_path / "nowhere", tasks=["MMLU"], device="cpu"
    )
    assert "MMLU" in partial["failed"] and partial["chatcore"] is None

    (run / "progress.jsonl").write_text(
        "\n".join(json.dumps({"type": "progress", "step": s, "loss": 6 - s / 10}) for s in range(1, 31))
    )
    md = write_report(run, {"id": "j1", "status": "succeeded"}).read_text()
    assert (
        "| python_keywords_lm |" in md
        and "ChatCORE" in md
        and "![pretrain training loss](pretrain_loss.png)" in md
    )


def test_mismatched_tokenizer_is_refused_before_any_work(trained_base, tmp_path, capsys):
    """`ncp eval base` with another run's tokenizer: a one-line error naming both sizes (it used to
    end in an IndexError deep inside the embedding)."""
    from services.cli.main import main
    from shared.nanochat.tokenizer import TokenizerMismatch, train_tokenizer

    data, _, ckpt = trained_base
    other = tmp_path / "other_tok"
    train_tokenizer(["some other corpus, small enough for a smaller vocabulary"] * 3, 300, out_dir=other)
    small = json.loads((other / "tokenizer.json").read_text())["added_tokens"][-1]["id"] + 1
    for run in (
        lambda: run_base_eval(ckpt, None, other, data, tmp_path / "eval", device="cpu"),
        lambda: run_chat_eval(ckpt, None, other, tmp_path / "eval", device="cpu"),
    ):
        with pytest.raises(TokenizerMismatch, match=rf"has {small} tokens but model .* vocab_size 512"):
            run()
    assert not (tmp_path / "eval").exists()  # refused before anything was written
    argv = ["eval", "base", "--checkpoint", str(ckpt), "--tokenizer", str(other), "--data", str(data),
            "--out", str(tmp_path / "eval"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncp: error: tokenizer") and f"has {small} tokens" in err and "512" in err
