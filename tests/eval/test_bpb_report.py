"""Bits per byte on a hand-computable case, and the run report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from shared.nanochat.eval.bpb import evaluate_bpb
from shared.nanochat.eval.report import smooth, write_report


class FixedLogits(nn.Module):
    """Uniform logits over V tokens, so every target costs exactly ln V nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab) + self.w
        if targets is None:
            return logits
        return nn.functional.cross_entropy(
            logits.view(-1, self.vocab), targets.view(-1), ignore_index=-1, reduction=loss_reduction
        )


def test_bpb_hand_computed():
    V = 8
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 4], dtype=torch.int32)  # id 0 is a special
    x = torch.zeros(1, 5, dtype=torch.long)
    y = torch.tensor([[1, 2, 0, -1, 7]])  # special and ignored targets count for nothing
    bpb = evaluate_bpb(FixedLogits(V), [(x, y)], 1, token_bytes)
    # 3 counted targets x ln 8 nats over (1 + 2 + 4) bytes
    assert bpb == pytest.approx(3 * math.log(8) / (math.log(2) * 7))


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_with_plots_and_tables(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    lines = [
        {"type": "progress", "step": s, "loss": 5.0 - 0.1 * s, "raw_loss": 5.0 - 0.1 * s + (0.3 if s % 2 else -0.3),
         "lr_mult": 1.0, "tokens_per_sec": 1000.0 + s, "mfu": 0.4, "total_training_seconds": 3.0 * s,
         "total_steps": 20}
        for s in range(1, 21)
    ]  # fmt: skip
    lines += [{"type": "eval", "step": 10, "val_bpb": 2.1}, {"type": "eval", "step": 20, "val_bpb": 1.9}]
    lines += [{"type": "progress", "stage": "sft", "step": s, "loss": 2.0 - 0.05 * s} for s in range(1, 6)]
    lines += [{"type": "eval", "stage": "sft", "step": 5, "val_bpb": 1.5}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"type": "progress", "st'  # cut mid-line by a crash
    (run / "progress.jsonl").write_text(text)
    (run / "eval" / "base_eval_000020.json").write_text(
        json.dumps(
            {
                "kind": "base",
                "step": 20,
                "val_bpb": 1.9,
                "bundle_dir": "x/fixture_bundle",
                "core": {
                    "results": {"t1": 0.5},
                    "centered": {"t1": 1 / 3},
                    "core": 1 / 3,
                    "failed": {"t2": "t2.jsonl:3: bad"},
                },
                "samples": [{"prompt": "The capital of France is", "completion": " Paris"}],
            }
        )
    )
    (run / "eval" / "chat_eval_000005.json").write_text(
        json.dumps(
            {
                "kind": "chat",
                "step": 5,
                "tasks": {"ARC-Easy": {"accuracy": 0.5, "centered": 1 / 3, "n": 4}},
                "chatcore": 1 / 3,
                "chatcore_complete": False,
                "failed": {},
                "samples": [],
            }
        )
    )
    # What the report stage passes: the job while its closing report stage runs.
    job = {"id": "job-1", "kind": "pipeline", "status": "running", "spec": {"depth": 4},
           "stages": {"pretrain": "succeeded", "sft": "succeeded", "report": "running"}}  # fmt: skip
    out = write_report(run, job)
    md = out.read_text()
    report = run / "report"
    assert out == report / "report.md"
    # one plot per stage and unit, never a mixed one
    assert sorted(p.name for p in report.glob("*.png")) == [
        "pretrain_bpb.png", "pretrain_loss.png", "sft_bpb.png", "sft_loss.png"
    ]  # fmt: skip
    assert all(_png(p) for p in report.glob("*.png"))
    for caption, file in [
        ("pretrain training loss", "pretrain_loss.png"),
        ("sft validation bpb", "sft_bpb.png"),
    ]:
        assert f"![{caption}]({file})" in md
    # the job as it ends, not "running"
    assert "| status | succeeded |" in md and "running" not in md and "| report | succeeded |" in md
    assert '"depth": 4' in md
    # the final table: steps done of planned, smoothed final loss, best and last bpb, throughput, MFU, time
    summary = md.split("## Summary", 1)[1].split("## Training", 1)[0]
    row = next(line for line in summary.splitlines() if line.startswith("| pretrain |"))
    raw = [5.0 - 0.1 * s + (0.3 if s % 2 else -0.3) for s in range(1, 21)]
    assert row.split(" | ")[1:] == [
        "20 / 20", f"{smooth(raw)[-1]:.4f}", "1.9000", "1.9000", "1,010", "40.0%", "1m 00s |"
    ]  # fmt: skip
    assert "| base model (step 20) | val bpb 1.9000 | CORE 0.3333 |" in md
    assert "| t1 | 0.5000 | 0.3333 |" in md and "t2.jsonl:3: bad" in md
    assert "| **mean (CORE)** | | **0.3333** |" in md
    assert "| ARC-Easy | 0.5000 | 0.3333 | 4 |" in md and "ChatCORE" in md
    assert "validation bits per byte: **1.9000**" in md
    assert "1 unreadable line(s)" in md and "| sft | 5 |" in md
    assert " Paris" in md


def test_smoothing_is_debiased_ema():
    assert smooth([4.0]) == [4.0]  # starts at the data, not at zero
    s = smooth([4.0, 2.0])
    assert s[1] == pytest.approx((0.9 * 0.1 * 4 + 0.1 * 2) / (1 - 0.81))


def test_failed_job_keeps_its_status(tmp_path):
    (tmp_path / "r").mkdir()
    job = {"id": "j", "status": "running", "stages": {"pretrain": "failed", "report": "running"}}
    assert "| status | running |" in write_report(tmp_path / "r", job).read_text()


def test_report_without_anything(tmp_path):
    (tmp_path / "r").mkdir()
    md = write_report(tmp_path / "r").read_text()
    assert "no training progress recorded" in md and "No evaluation results" in md
    assert not list((tmp_path / "r" / "report").glob("*.png"))
    with pytest.raises(FileNotFoundError, match="run_dir"):
        write_report(tmp_path / "missing")
