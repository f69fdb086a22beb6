"""The pretraining loop on a tiny CPU model: golden losses, learning, exact resume, hooks, config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from shared.nanochat.checkpoint import build_model, latest_step, load_checkpoint
from shared.nanochat.train import TrainConfig, TrainHooks, train

GOLDEN = Path(__file__).with_name("golden_losses.json")


def test_golden_losses(tiny_config):
    """First 10 losses of the tiny debug model are pinned (regenerate deliberately with
    NCP_REGEN_GOLDEN=1 after an intended change to model, optimizer, data or tokenizer)."""
    cfg = tiny_config(num_iterations=10)
    result = train(cfg)
    assert len(result.losses) == 10
    if os.environ.get("NCP_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(
            json.dumps(
                {
                    "note": "tests/core_train/conftest.py tiny_config(num_iterations=10)",
                    "losses": result.losses,
                },
                indent=2,
            )
            + "\n"
        )
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert result.losses == pytest.approx(golden, rel=2e-4, abs=2e-4)


def test_loss_falls_and_val_bpb_improves(tiny_config):
    evals = []
    cfg = tiny_config(num_iterations=40, matrix_lr=0.2, embedding_lr=3.0, unembedding_lr=0.08, eval_every=40)
    result = train(cfg, TrainHooks(on_eval=evals.append))
    first = sum(result.losses[:3]) / 3
    last = sum(result.losses[-3:]) / 3
    assert last < first - 0.8, (first, last)
    assert [e["step"] for e in evals] == [0, 40]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert result.val_bpb == evals[-1]["val_bpb"]


def test_resume_continues_loss_curve_exactly(tiny_config, tmp_path):
    full = train(tiny_config(num_iterations=8, checkpoint_dir=str(tmp_path / "full")))

    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] > 5  # polled once before each step: stop after 5 steps

    cfg = tiny_config(num_iterations=8, checkpoint_dir=str(tmp_path / "split"))
    first = train(cfg, TrainHooks(should_stop=stop_after_five))
    assert first.stopped and first.step == 5 and first.checkpoint_step == 5
    assert latest_step(tmp_path / "split") == 5
    second = train(cfg)  # resume=True: newest complete checkpoint
    assert second.start_step == 5 and not second.stopped and second.step == 8
    assert first.losses + second.losses == full.losses  # bit-identical on CPU

    a, _ = build_model(tmp_path / "full")
    b, _ = build_model(tmp_path / "split")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_hooks_progress_checkpoint_and_meta(tiny_config):
    progress, ckpts, evals = [], [], []
    cfg = tiny_config(num_iterations=6, save_every=3, eval_every=3, log_every=2)
    result = train(
        cfg, TrainHooks(on_progress=progress.append, on_checkpoint=ckpts.append, on_eval=evals.append)
    )
    assert [p["step"] for p in progress] == [2, 4, 6]
    for p in progress:
        assert p["total_steps"] == 6
        assert p["mfu"] is None  # CPU: no peak FLOPs to compare with
        assert p["tokens_per_sec"] > 0 and p["peak_memory_bytes"] > 0 and p["eta_seconds"] >= 0
        for key in ("loss", "raw_loss", "lr_mult", "muon_momentum"):
            assert isinstance(p[key], float)
    assert progress[-1]["eta_seconds"] == 0
    assert [c["step"] for c in ckpts] == [3, 6]
    assert ckpts[0]["files"] == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    _, optim, meta = load_checkpoint(cfg.checkpoint_dir, load_optimizer=True)
    assert meta["step"] == 6 and meta["val_bpb"] == result.val_bpb
    assert TrainConfig.from_dict(meta["user_config"]) == cfg
    assert meta["total_batch_size"] == 512 and meta["plan"]["grad_accum_steps"] == 2
    assert set(meta["loop_state"]) == {"min_val_bpb", "smooth_train_loss", "total_training_time"}
    assert meta["dataloader_state_dict"]["batches"] == 12  # 6 steps x 2 micro-batches consumed
    assert optim is not None and len(optim["param_groups"]) >= 7


def test_keep_last_retention(tiny_config):
    cfg = tiny_config(num_iterations=8, save_every=2, keep_last=2, milestone_every=4)
    train(cfg)
    steps = sorted(int(p.name[5:11]) for p in Path(cfg.checkpoint_dir).glob("meta_*.json"))
    assert steps == [4, 6, 8]


def test_resume_refuses_a_different_model(tiny_config):
    cfg = tiny_config(num_iterations=2)
    train(cfg)
    with pytest.raises(ValueError, match="different model"):
        train(tiny_config(num_iterations=4, depth=3))


def test_config_round_trip():
    cfg = TrainConfig(data_dir="d", tokenizer_dir="t", checkpoint_dir="c", depth=4, compile=False)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "field,value",
    [
        ("depth", 0),
        ("device_batch_size", -1),
        ("num_iterations", 0),
        ("total_batch_size", 1.5),
        ("warmdown_ratio", 2.0),
        ("matrix_lr", 0.0),
        ("weight_decay", -0.1),
        ("device", "tpu"),
        ("dtype", "int8"),
        ("window_pattern", "SXL"),
        ("eval_every", -5),
        ("checkpoint_dir", ""),
    ],
)
def test_bad_config_names_field(field, value):
    kw = dict(data_dir="d", tokenizer_dir="t", checkpoint_dir="c")
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)


def test_from_dict_rejects_unknown_and_missing():
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"data_dir": "d", "tokenizer_dir": "t", "checkpoint_dir": "c", "bogus": 1})
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig.from_dict({"data_dir": "d", "tokenizer_dir": "t"})


def test_batch_not_divisible_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="total_batch_size"):
        train(tiny_config(total_batch_size=300))


def test_ncp_train_cli(tiny_config, tmp_path, capsys):
    from services.cli.main import main as ncp

    cfg = tiny_config(num_iterations=3)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**cfg.to_dict(), "num_iterations": 50}))
    rc = ncp(
        [
            "train",
            "--config",
            str(config),
            "--num-iterations",
            "3",
            "--set",
            "eval_every=3",
            "--set",
            "compile=false",
            "--checkpoint-dir",
            str(tmp_path / "cli_ckpt"),
            "--progress-file",
            str(tmp_path / "progress.jsonl"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "step      3/3 | loss" in out and "val bpb" in out and "finished at step 3/3" in out
    assert "kernels: cpu | attention full sdpa | eager | float32 | fp8 off | no peak FLOP/s" in out
    assert latest_step(tmp_path / "cli_ckpt") == 3
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["eval", "progress", "progress", "progress", "eval", "checkpoint"]
    assert [r["raw_loss"] for r in records if r["type"] == "progress"] == pytest.approx(
        [float(line.split("raw ")[1].split(")")[0]) for line in out.splitlines() if "(raw " in line], abs=1e-4
    )
    rc = ncp(
        [
            "train",
            "--config",
            str(config),
            "--num-iterations",
            "1",
            "--fp8",
            "--checkpoint-dir",
            str(tmp_path / "f"),
        ]
    )
    assert rc == 0 and "fp8 e4m3fn/e5m2 (12 layers)" in capsys.readouterr().out
    assert ncp(["train", "--config", str(config), "--set", "depth=-2"]) == 2
    assert "depth" in capsys.readouterr().err


def test_first_progress_record_carries_the_kernel_report(tiny_config):
    progress = []
    train(tiny_config(num_iterations=4, log_every=2), TrainHooks(on_progress=progress.append))
    assert [p["step"] for p in progress] == [2, 4]  # the cadence is unchanged
    assert "kernels" not in progress[1]
    k = progress[0]["kernels"]
    assert k["device"] == "cpu" and k["device_backend"] == "cpu" and k["compute_dtype"] == "float32"
    assert k["attention"] == {"full": "sdpa"}  # window_pattern "L"
    assert k["compiled"] is False and k["graph_breaks"] is None
    assert (k["fp8"], k["fp8_layers"], k["fp8_formats"]) == (False, 0, None)
    assert k["peak_flops"] is None and k["slow_fallbacks"] == []  # CPU: nothing to flag
    json.dumps(k)  # goes into progress.jsonl as it is


def test_fp8_training_tracks_full_precision(tiny_config, tmp_path):
    """FP8 (CPU `_scaled_mm`) through the real trainer: every transformer matrix converted, the
    report says so, losses within 0.05 nats of the full-precision run's, and the checkpoint holds
    the ordinary full-precision state dict."""
    base = train(tiny_config(num_iterations=6, checkpoint_dir=str(tmp_path / "base")))
    progress = []
    cfg = tiny_config(num_iterations=6, checkpoint_dir=str(tmp_path / "fp8"), fp8=True)
    run = train(cfg, TrainHooks(on_progress=progress.append))
    k = progress[0]["kernels"]
    assert (k["fp8"], k["fp8_layers"], k["fp8_formats"]) == (True, 2 * 6, "e4m3fn/e5m2")
    assert max(abs(a - b) for a, b in zip(base.losses, run.losses, strict=True)) < 0.05
    assert base.losses != run.losses
    a, _ = build_model(tmp_path / "base")
    b, _ = build_model(tmp_path / "fp8")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(v.dtype == b.state_dict()[n].dtype for n, v in a.state_dict().items())


def test_fp8_needs_rows_divisible_by_16():
    with pytest.raises(ValueError, match="fp8"):
        TrainConfig(
            data_dir="d",
            tokenizer_dir="t",
            checkpoint_dir="c",
            fp8=True,
            device_batch_size=3,
            max_seq_len=100,
        )
