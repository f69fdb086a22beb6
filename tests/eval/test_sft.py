"""SFT on a tiny really-pretrained base model: loss falls, momenta load, hooks, stop, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.nanochat.checkpoint import latest_step, load_checkpoint
from shared.nanochat.sft import SFTConfig, masked_loss, sft
from shared.nanochat.train import TrainHooks


def _cfg(trained_base, tmp_path, **kw) -> SFTConfig:
    _, tok, base = trained_base
    args = dict(
        base_checkpoint_dir=str(base),
        tokenizer_dir=str(tok),
        out_dir=str(tmp_path / "chatsft_checkpoints" / "d2"),
        mixture="demo",
        num_iterations=40,
        device_batch_size=4,
        device="cpu",
        matrix_lr=0.02,
        embedding_lr=0.3,
        unembedding_lr=0.02,
        init_lr_frac=1.0,
        warmdown_ratio=0.2,
    )
    args.update(kw)
    return SFTConfig(**args)


def test_config_roundtrip_and_validation(tmp_path):
    cfg = SFTConfig(
        base_checkpoint_dir="b", tokenizer_dir="t", out_dir="o", mixture="jsonl", conversations=("c.jsonl",)
    )
    assert SFTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.weight_decay == 0.0
    with pytest.raises(ValueError, match="mixture"):
        SFTConfig(base_checkpoint_dir="b", tokenizer_dir="t", out_dir="o", mixture="web")
    with pytest.raises(ValueError, match="tasks_dir"):
        SFTConfig(base_checkpoint_dir="b", tokenizer_dir="t", out_dir="o", mixture="default")
    with pytest.raises(ValueError, match="num_iterations"):
        SFTConfig(base_checkpoint_dir="b", tokenizer_dir="t", out_dir="o", num_iterations=0)
    with pytest.raises(ValueError, match="unknown fields"):
        SFTConfig.from_dict({"base_checkpoint_dir": "b", "tokenizer_dir": "t", "out_dir": "o", "lr": 1})


def test_all_masked_batch_gives_zero_not_nan(trained_base):
    from shared.nanochat.checkpoint import build_model

    model, _ = build_model(trained_base[2])
    x = torch.randint(0, 100, (2, 16))
    y = torch.full((2, 16), -1)
    assert math.isnan(model(x, y).item())  # why masked_loss exists
    loss, n = masked_loss(model, x, y)
    assert n == 0 and loss.item() == 0.0
    y[0, 3] = 5
    loss, n = masked_loss(model, x, y)
    assert n == 1 and math.isfinite(loss.item()) and loss.item() > 0


def test_sft_loss_falls_and_writes_chat_checkpoint(trained_base, tmp_path):
    events = {"progress": [], "checkpoint": [], "eval": []}
    hooks = TrainHooks(
        on_progress=events["progress"].append,
        on_checkpoint=events["checkpoint"].append,
        on_eval=events["eval"].append,
    )
    cfg = _cfg(trained_base, tmp_path)
    result = sft(cfg, hooks)
    assert result.step == 40 and result.checkpoint_step == 40 and not result.stopped
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(math.isfinite(v) for v in result.losses)
    out = tmp_path / "chatsft_checkpoints" / "d2"
    assert latest_step(out) == 40
    _, optim, meta = load_checkpoint(out, 40, load_optimizer=True)
    assert meta["kind"] == "sft" and meta["optimizer_loaded"] is True and optim is not None
    assert meta["user_config"]["mixture"] == "demo"
    assert events["progress"][-1]["step"] == 40 and events["progress"][-1]["total_steps"] == 40
    assert events["checkpoint"][-1]["step"] == 40 and any(
        f.startswith("model_") for f in events["checkpoint"][-1]["files"]
    )
    assert events["eval"] and math.isfinite(events["eval"][-1]["val_bpb"])
    assert {e["stage"] for k in events for e in events[k]} == {"sft"}  # told apart from pretraining
    kernels = events["progress"][0]["kernels"]  # the first record says what runs
    assert kernels["compiled"] is False and kernels["fp8"] is False and kernels["slow_fallbacks"] == []
    assert all("kernels" not in p for p in events["progress"][1:])
    # resuming a finished run does no more steps
    again = sft(cfg)
    assert again.step == 40 and again.losses == []


def test_sft_stops_on_request_and_resumes(trained_base, tmp_path):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    cfg = _cfg(trained_base, tmp_path, num_iterations=6)
    r = sft(cfg, TrainHooks(should_stop=stop))
    assert r.stopped and r.step == 3 and r.checkpoint_step == 3
    r2 = sft(cfg)
    assert not r2.stopped and r2.start_step == 3 and r2.step == 6 and len(r2.losses) == 3


def test_sft_user_jsonl_bad_line(trained_base, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n[1, 2]\n'
    )
    with pytest.raises(ValueError, match=r"mine.jsonl:2: message 0 must be a dict"):
        sft(_cfg(trained_base, tmp_path, mixture="jsonl", conversations=(str(bad),)))


def test_base_momenta_load_with_fresh_lrs(trained_base, tmp_path):
    from shared.nanochat.checkpoint import build_model
    from shared.nanochat.optim import load_saved_state
    from shared.nanochat.sft import _optimizer

    model, meta = build_model(trained_base[2])
    _, base_optim, _ = load_checkpoint(trained_base[2], None, load_optimizer=True)
    cfg = _cfg(trained_base, tmp_path, init_lr_frac=0.8)
    opt = _optimizer(model, cfg, meta, torch.device("cpu"))
    fresh = [(g["lr"], g["initial_lr"], g.get("weight_decay")) for g in opt.param_groups]
    load_saved_state(opt, base_optim)
    assert [(g["lr"], g["initial_lr"], g.get("weight_decay")) for g in opt.param_groups] == fresh
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert muon["lr"] == pytest.approx(0.8 * 0.02) and muon["weight_decay"] == 0.0
    # every per-parameter buffer of the base run is now in the SFT optimizer
    loaded = opt.state_dict()["state"]
    assert loaded.keys() == base_optim["state"].keys() and loaded
    for k, st in base_optim["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(loaded[k][name], v), (k, name)


def test_sft_two_ranks_gloo(trained_base, tmp_path):
    """Two CPU ranks under torchrun: shared stop/epoch flags, sharded optimizer, one checkpoint."""
    import os
    import subprocess
    import sys

    cfg = _cfg(trained_base, tmp_path, num_iterations=-1, device_batch_size=2, max_seq_len=64)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "run.py").write_text(
        "import json, os, sys\n"
        "from shared.nanochat.sft import SFTConfig, sft\n"
        "from shared.nanochat.device import cleanup_distributed\n"
        "r = sft(SFTConfig.from_dict(json.load(open(sys.argv[1]))))\n"
        "out = sys.argv[2] + '/result_' + os.environ['RANK'] + '.json'\n"
        "json.dump([r.step, r.checkpoint_step, r.stopped], open(out, 'w'))\n"
        "cleanup_distributed()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(tmp_path / "run.py"), str(tmp_path / "cfg.json"), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]  # both ranks stop at the same step
    step, checkpoint_step, stopped = results[0]
    assert checkpoint_step == step and not stopped
    out = tmp_path / "chatsft_checkpoints" / "d2"
    assert latest_step(out) == step > 0
    assert (out / f"optim_{step:06d}_rank1.pt").exists()
    _, optim1, meta = load_checkpoint(out, step, load_optimizer=True, rank=1)
    assert optim1 is not None and meta["loop_state"]["packer"]["consumed"] > 0
    # the base was saved by one rank: its momenta cannot be split onto two, so both start fresh
    assert meta["optimizer_loaded"] is False
