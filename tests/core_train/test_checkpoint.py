"""Checkpoints: round trip, atomicity under crashes, corrupt files, retention, reference import, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.cli.main import main as ncp
from shared.nanochat.checkpoint import (
    CheckpointError,
    apply_retention,
    build_model,
    import_reference,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from shared.nanochat.config import GPTConfig
from shared.nanochat.gpt import GPT

REPO = Path(__file__).resolve().parents[2]


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L"
    )
    model = GPT(cfg)
    model.init_weights()
    return model


def meta_for(model: GPT, **extra) -> dict:
    return {"model_config": model.config.to_dict(), "val_bpb": 1.5, **extra}


def save(d: Path, step: int, model: GPT, optim=None, **extra) -> Path:
    return save_checkpoint(d, step, model.state_dict(), optim, meta_for(model, **extra))


def test_round_trip_and_build_model_from_meta_alone(tmp_path):
    model = tiny_model()
    opt_state = {
        "state": {0: {"step": 3, "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    meta_path = save(tmp_path, 7, model, opt_state, dataloader_state_dict={"pq_idx": 0, "rg_idx": 1})
    assert meta_path.name == "meta_000007.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta_000007.json",
        "model_000007.pt",
        "optim_000007_rank0.pt",
    ]
    state, optim, meta = load_checkpoint(tmp_path, load_optimizer=True)
    assert meta["step"] == 7 and meta["dataloader_state_dict"] == {"pq_idx": 0, "rg_idx": 1}
    assert set(meta["files"]) == {"model_000007.pt", "optim_000007_rank0.pt"}
    assert optim["state"][0]["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    rebuilt, meta2 = build_model(tmp_path, device="cpu")
    assert rebuilt.config == model.config and not rebuilt.training
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx), model(idx))


def test_latest_step_skips_incomplete_and_explicit_incomplete_raises(tmp_path):
    model = tiny_model()
    save(tmp_path, 10, model)
    save(tmp_path, 20, model)
    (tmp_path / "meta_000020.json").unlink()  # as if the crash hit before the meta was written
    assert latest_step(tmp_path) == 10
    with pytest.raises(CheckpointError, match="meta_000020.json missing"):
        load_checkpoint(tmp_path, 20)
    assert load_checkpoint(tmp_path)[2]["step"] == 10
    infos = {i.step: i for i in list_checkpoints(tmp_path)}
    assert infos[10].complete and not infos[20].complete


def test_truncated_model_file_is_incomplete_and_never_half_loaded(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model)
    save(tmp_path, 2, model)
    p = tmp_path / "model_000002.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert latest_step(tmp_path) == 1
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path, 2)


def test_foreign_and_corrupt_files_give_clear_errors(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model)
    # Same size, garbage content: passes the size check, fails the weights-only load.
    p = tmp_path / "model_000001.pt"
    p.write_bytes(b"\0" * p.stat().st_size)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path, 1)
    # A pickle that would need arbitrary code: refused by weights_only.
    d2 = tmp_path / "evil"
    save(d2, 1, model)
    evil = d2 / "model_000001.pt"
    torch.save({"x": Path("/etc")}, evil)
    meta = json.loads((d2 / "meta_000001.json").read_text())
    meta["files"]["model_000001.pt"] = evil.stat().st_size
    (d2 / "meta_000001.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model_000001.pt"):
        load_checkpoint(d2, 1)
    # Unparseable meta: the checkpoint is incomplete, not a crash.
    (tmp_path / "meta_000001.json").write_text("{not json")
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_resave_same_step_invalidates_first(tmp_path):
    model = tiny_model()
    save(tmp_path, 5, model)
    # Simulate a crash while re-saving step 5: meta removed first, model replaced, no new meta.
    other = tiny_model(seed=1)
    (tmp_path / "meta_000005.json").unlink()
    torch.save(other.state_dict(), tmp_path / "model_000005.pt")
    assert latest_step(tmp_path) is None


_CRASH_SCRIPT = r"""
import sys, torch, os
sys.path.insert(0, {repo!r})
from shared.nanochat import checkpoint
from tests_helper_model import make
model = make()
big = {{"pad": torch.zeros(64 * 1024 * 1024 // 4)}}  # 64 MiB optimizer shard: slow enough to kill
real_save = checkpoint._save_torch
def slow_save(path, obj):
    if path.name.startswith("model_"):
        open({flag!r}, "w").close()  # tell the parent we are mid-save
        import time; time.sleep(30)
    return real_save(path, obj)
checkpoint._save_torch = slow_save
checkpoint.save_checkpoint({d!r}, 2, model.state_dict(), big, {{"model_config": model.config.to_dict()}})
"""


def test_killed_mid_save_leaves_previous_checkpoint_usable(tmp_path):
    model = tiny_model()
    d = tmp_path / "ckpt"
    save(d, 1, model)
    helper = tmp_path / "tests_helper_model.py"
    helper.write_text(
        "import torch\nfrom shared.nanochat.config import GPTConfig\nfrom shared.nanochat.gpt import GPT\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    m = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,"
        " window_pattern='L'))\n    m.init_weights()\n    return m\n"
    )
    flag = tmp_path / "mid_save"
    script = _CRASH_SCRIPT.format(repo=str(REPO), flag=str(flag), d=str(d))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.time() + 60
    while not flag.exists():
        assert proc.poll() is None, "helper exited before reaching the save"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (d / "optim_000002_rank0.pt").exists()  # the shard landed, the rest did not
    assert latest_step(d) == 1
    state, _, meta = load_checkpoint(d)
    assert meta["step"] == 1
    rebuilt, _ = build_model(d)
    assert rebuilt.config == model.config
    # Leftover debris of the failed save is cleaned by retention once a newer save completes.
    (d / ".model_000002.pt.tmp-999999").write_bytes(b"partial")
    save(d, 3, model)
    removed = apply_retention(d, keep_last=1)
    assert removed == [1, 2]
    assert sorted(p.name for p in d.iterdir()) == [
        "meta_000003.json",
        "model_000003.pt",
    ]


def test_retention_keeps_last_and_milestones(tmp_path):
    model = tiny_model()
    for s in (100, 200, 300, 400, 500):
        save(tmp_path, s, model)
    # An in-progress (incomplete) newer save must survive retention.
    torch.save({"x": torch.zeros(1)}, tmp_path / "model_000600.pt")
    removed = apply_retention(tmp_path, keep_last=2, milestone_every=200)
    assert removed == [100, 300]
    assert [i.step for i in list_checkpoints(tmp_path)] == [200, 400, 500, 600]
    with pytest.raises(ValueError, match="keep_last"):
        apply_retention(tmp_path, keep_last=0)


def _write_reference_dir(d: Path, model: GPT, step: int = 50) -> None:
    """A checkpoint as the reference nanochat writes it: plain torch.save + json, no file list,
    keys possibly prefixed by torch.compile."""
    d.mkdir(parents=True)
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, d / f"model_{step:06d}.pt")
    torch.save({"state": {}, "param_groups": []}, d / f"optim_{step:06d}_rank0.pt")
    cfg = model.config.to_dict()
    del cfg["window_pattern"]  # older reference metas lack it (means full context)
    meta = {
        "step": step,
        "val_bpb": 0.9,
        "model_config": cfg,
        "user_config": {"depth": 2},
        "device_batch_size": 4,
        "max_seq_len": 32,
        "dataloader_state_dict": {"pq_idx": 3, "rg_idx": 8},
        "loop_state": {"min_val_bpb": 0.9, "smooth_train_loss": 3.0, "total_training_time": 1.0},
    }
    (d / f"meta_{step:06d}.json").write_text(json.dumps(meta))


def test_import_reference_checkpoint(tmp_path):
    model = tiny_model()
    src, dst = tmp_path / "ref" / "d2", tmp_path / "ours" / "d2"
    _write_reference_dir(src, model)
    assert latest_step(src) == 50  # reference layout is readable as is
    assert import_reference(src, dst) == [50]
    state, optim, meta = load_checkpoint(dst, load_optimizer=True)
    assert meta["loop_state"]["smooth_train_loss"] == 3.0 and meta["model_config"]["window_pattern"] == "L"
    assert set(meta["files"]) == {"model_000050.pt", "optim_000050_rank0.pt"}
    assert all(not k.startswith("_orig_mod.") for k in state)
    rebuilt, _ = build_model(dst)
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx), model(idx))


def test_import_fills_lambdas_older_upstream_checkpoints_lack(tmp_path):
    from tests.upstream import TINY, tiny_state, write_upstream_checkpoint

    state = tiny_state()
    del state["resid_lambdas"], state["x0_lambdas"]
    write_upstream_checkpoint(tmp_path / "old", 7, state, TINY)
    assert import_reference(tmp_path / "old", tmp_path / "new") == [7]
    got, _, _ = load_checkpoint(tmp_path / "new", 7)
    assert torch.equal(got["resid_lambdas"], torch.ones(2)) and torch.equal(got["x0_lambdas"], torch.zeros(2))


def test_import_rejects_mismatched_state(tmp_path):
    model = tiny_model()
    src = tmp_path / "ref"
    _write_reference_dir(src, model)
    state = torch.load(src / "model_000050.pt", weights_only=True)
    state.pop("_orig_mod.lm_head.weight")
    state["_orig_mod.transformer.wte.weight"] = torch.zeros(10, 64)
    torch.save(state, src / "model_000050.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['lm_head.weight'\].*transformer.wte.weight"):
        import_reference(src, tmp_path / "dst")
    assert latest_step(tmp_path / "dst") is None


def test_cli_list_and_import(tmp_path, capsys):
    model = tiny_model()
    src, dst = tmp_path / "ref", tmp_path / "dst"
    _write_reference_dir(src, model, step=50)
    assert ncp(["checkpoint", "import", str(src), str(dst)]) == 0
    assert "imported step 50" in capsys.readouterr().out
    save(dst, 60, model)
    (dst / "meta_000060.json").unlink()
    assert ncp(["checkpoint", "list", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "50" in out and "complete" in out and "incomplete" in out
    assert ncp(["checkpoint", "list", str(dst), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["complete"]) for r in rows] == [(50, True), (60, False)]
    assert ncp(["checkpoint", "import", str(tmp_path / "nope"), str(dst)]) == 2
    assert "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ optimizer state across rank counts


def _assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_shards_of_2_ranks_continue_identically_on_1_and_3(tmp_path):
    """Genuine 2-rank MuonAdamW shards (gloo), resharded: one more step on 1 rank and on 3 ranks
    gives the parameters that step gives on the original 2 ranks. The tiny model covers every
    layout: row-sharded AdamW tensors (320 rows: split on 2, whole on 3), tiny all-reduced ones,
    and Muon stacks of 8, 2 and 1 matrices (padding; ranks that own nothing)."""
    from shared.nanochat.checkpoint import copy_checkpoint, saved_world_size
    from tests.upstream import TINY, run_optimizer, tiny_state, write_upstream_checkpoint

    start = tiny_state()
    # 3 steps with each rank's own gradients, then one step with the same gradient everywhere (so
    # its mean does not depend on the number of ranks), all on 2 ranks
    model3, shards = run_optimizer(2, start, [(0, True), (1, True), (2, True)], tmp_path / "a")
    want, _ = run_optimizer(2, model3, [(3, False)], tmp_path / "a4", optim_shards=shards)
    write_upstream_checkpoint(tmp_path / "up", 3, model3, TINY, shards)  # a reference checkpoint
    assert saved_world_size(tmp_path / "up", 3) == 2

    for world in (1, 3):
        dst = tmp_path / f"ranks{world}"
        assert copy_checkpoint(tmp_path / "up", None, dst, world_size=world) == 3
        meta = load_checkpoint(dst, 3)[2]
        assert meta["world_size"] == world and meta["loop_state"]["min_val_bpb"] == 1.25
        assert meta["copied_from"]["step"] == 3 and latest_step(dst) == 3
        resharded = [load_checkpoint(dst, 3, load_optimizer=True, rank=r)[1] for r in range(world)]
        got, _ = run_optimizer(world, model3, [(3, False)], tmp_path / f"b{world}", optim_shards=resharded)
        _assert_same_states(got, want)
        assert not torch.equal(got["transformer.wte.weight"], model3["transformer.wte.weight"])  # it moved


def test_reshard_round_trip_and_refusals(tmp_path):
    from shared.nanochat.checkpoint import copy_checkpoint
    from shared.nanochat.optim_reshard import ReshardError, group_layout, reshard_optimizer_states
    from tests.upstream import TINY, run_optimizer, tiny_state

    _, (single,) = run_optimizer(1, tiny_state(), [(0, True), (1, True)], tmp_path / "s")
    layout = group_layout(TINY)
    four = reshard_optimizer_states([single], layout, 4)
    assert len(four) == 4 and four[0]["param_groups"] == single["param_groups"]
    (back,) = reshard_optimizer_states(four, layout, 1)
    assert back["state"].keys() == single["state"].keys()
    for i, st in single["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v) if torch.is_tensor(v) else back["state"][i][k] == v
    wrong = [{**s, "param_groups": s["param_groups"][:-1]} for s in four]
    with pytest.raises(ReshardError, match="parameter groups"):
        reshard_optimizer_states(wrong, layout, 2)
    with pytest.raises(ReshardError, match="join to"):
        reshard_optimizer_states(four[:3], layout, 2)  # a missing shard
    model = tiny_model()
    save(tmp_path / "w", 5, model)  # weights only
    with pytest.raises(CheckpointError, match="no optimizer state; continue it weights-only"):
        copy_checkpoint(tmp_path / "w", 5, tmp_path / "c", world_size=2)
    assert copy_checkpoint(tmp_path / "w", 5, tmp_path / "c", world_size=2, with_optimizer=False) == 5
    assert load_checkpoint(tmp_path / "c", 5)[2]["world_size"] == 2
    assert not list((tmp_path / "c").glob("optim_*"))
