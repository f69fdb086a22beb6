"""The model registry (shared/db/model_registry.py) on PostgreSQL and SQLite: imports and job
models registered, checkpoints refreshed from real checkpoint folders, exports recorded, and
resolve_checkpoint's answers and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.db import model_registry as mr
from shared.db import registry
from shared.nanochat.checkpoint import save_checkpoint
from tests.tiny import tiny_spec


def _save(d: Path, step: int, *, world_size: int = 0, vocab: int = 300) -> None:
    """A real checkpoint (tiny tensors): model, meta and `world_size` optimizer shards (0: none)."""
    meta = {"model_config": {"vocab_size": vocab, "n_layer": 1}, "val_bpb": 1.0}
    state = {"w": torch.full((2,), float(step))}
    for rank in range(1, world_size):  # the other ranks' shards first: rank 0 waits for them
        save_checkpoint(d, step, None, {"m": torch.zeros(1)}, meta, rank=rank, world_size=world_size)
    save_checkpoint(
        d,
        step,
        state,
        {"m": torch.zeros(1)} if world_size else None,
        meta,
        rank=0,
        world_size=max(world_size, 1),
    )


def _manifest(root: Path, name: str = "imp") -> dict:
    """What nanochat_import.import_nanochat returns (its documented keys)."""
    return {
        "format": "ncp-model-1",
        "name": name,
        "source": {"kind": "nanochat", "path": "/somewhere/.cache/nanochat"},
        "tokenizer": {"path": "tokenizer", "vocab_size": 300},
        "checkpoints": [
            {
                "phase": "base",
                "tag": "d2",
                "path": "base_checkpoints/d2",
                "steps": [3, 7],
                "vocab_size": 300,
                "optimizer_ranks": {"3": 2, "7": 0},
            },
            {
                "phase": "sft",
                "tag": "d2",
                "path": "chatsft_checkpoints/d2",
                "steps": [5],
                "vocab_size": 300,
                "optimizer_ranks": {"5": 0},
            },
        ],  # fmt: skip
        "warnings": [],
        "path": str(root),
    }


def test_register_import_and_resolve(sessions, tmp_path):
    root = tmp_path / "models" / "imp"
    with sessions() as s:
        m = mr.register_import(s, _manifest(root), parent_model="upstream-d20")
        assert (m.source, m.checkpoint_tag, m.vocab_size, m.parent_model) == (
            "import",
            "d2",
            300,
            "upstream-d20",
        )
        assert m.tokenizer_path == str(root / "tokenizer")
        assert mr.latest_steps(m) == {"base": 7, "sft": 5}
    with sessions() as s:
        ref = mr.resolve_checkpoint(s, "imp", "base", None)
        assert ref == mr.ModelRef(
            name="imp", root=root, tag="d2", phase="base", step=7,
            checkpoint_dir=root / "base_checkpoints" / "d2", tokenizer_dir=root / "tokenizer",
            has_optimizer=False, world_size=None,
        )  # fmt: skip
        ref3 = mr.resolve_checkpoint(s, "imp", "base", 3)
        assert (ref3.step, ref3.has_optimizer, ref3.world_size) == (3, True, 2)
        assert (
            mr.resolve_checkpoint(s, "imp", "sft", None).checkpoint_dir == root / "chatsft_checkpoints" / "d2"
        )
        with pytest.raises(
            mr.CheckpointNotFound, match=r"'imp' has no base checkpoint at step 4; base steps: \[3, 7\]"
        ):
            mr.resolve_checkpoint(s, "imp", "base", 4)
        with pytest.raises(
            ValueError, match=r"'imp' has no rl checkpoint \(it has: base up to step 7, sft up to step 5\)"
        ):
            mr.resolve_checkpoint(s, "imp", "rl", None)
        with pytest.raises(ValueError, match="model 'nope' not found"):
            mr.resolve_checkpoint(s, "nope", "base", None)
        with pytest.raises(ValueError, match="phase: 'chat'"):
            mr.resolve_checkpoint(s, "imp", "chat", None)
        with pytest.raises(mr.ModelExists, match="name: model 'imp' already exists"):
            mr.register_import(s, _manifest(tmp_path / "elsewhere"))
        assert [m.name for m in mr.list_models(s)] == ["imp"]


def test_import_without_tokenizer_or_checkpoints(sessions, tmp_path):
    manifest = {**_manifest(tmp_path / "bare", "bare"), "tokenizer": None}
    with sessions() as s:
        m = mr.register_import(s, manifest)
        assert m.tokenizer_path is None
        assert mr.resolve_checkpoint(s, "bare", "sft", None).tokenizer_dir is None
        with pytest.raises(ValueError, match="name: 'bad name!'"):
            mr.register_import(s, {**manifest, "name": "bad name!"})


def test_job_model_is_idempotent_and_follows_disk(sessions, tmp_path):
    run = tmp_path / "runs" / "j"
    base, sft = run / "base_checkpoints" / "d2", run / "chatsft_checkpoints" / "d2"
    _save(base, 10, world_size=2)
    _save(base, 20, world_size=1)
    with sessions() as s:
        job = registry.create_job(s, tiny_spec())
        name = mr.job_model_name(job.id)
        assert name == f"job-{job.id[:8]}"
        for _ in range(2):  # a redelivered pretrain stage registers again: same row
            mr.register_job_model(s, job.id, name, run, "d2", 300, run / "tokenizer")
            m = mr.refresh_checkpoints(s, name, ["base"])
        assert len(mr.list_models(s)) == 1 and m.source_job_id == job.id
        assert [(c.phase, c.step, c.has_optimizer, c.optimizer_world_size) for c in m.checkpoints] == [
            ("base", 10, True, 2),
            ("base", 20, True, 1),
        ]
        # SFT adds its phase to the same model; a different vocab in the newest meta is taken up.
        _save(sft, 5, vocab=320)
        mr.register_job_model(s, job.id, name, run, "d2", 300, run / "tokenizer")
        m = mr.refresh_checkpoints(s, name)
        assert mr.latest_steps(m) == {"base": 20, "sft": 5} and m.vocab_size == 320
        # retention deleted step 10: its row goes
        for f in base.glob("*_000010*"):
            f.unlink()
        m = mr.refresh_checkpoints(s, name)
        assert mr.steps(m, "base") == [20]
        # another job cannot take the name
        other = registry.create_job(s, tiny_spec())
        with pytest.raises(mr.ModelExists, match=name):
            mr.register_job_model(s, other.id, name, run, "d2", 300, None)
    with sessions() as s:
        assert mr.resolve_checkpoint(s, name, "base", None).step == 20
        # the job's row going (ON DELETE SET NULL) leaves the model and its checkpoints
        s.delete(registry.get_job(s, job.id))
        s.commit()
    with sessions() as s:
        m = mr.require_model(s, name)
        assert m.source_job_id is None and mr.steps(m, "sft") == [5]


def test_record_export_upserts_by_path(sessions, tmp_path):
    with sessions() as s:
        mr.register_import(s, _manifest(tmp_path / "imp"))
        mr.record_export(s, "imp", tmp_path / "exp", phase="sft", step=5)
        mr.record_export(s, "imp", tmp_path / "exp", phase="sft", step=6)  # re-exported in place
        mr.record_export(s, "imp", tmp_path / "exp2", phase="base", step=7)
    with sessions() as s:
        m = mr.require_model(s, "imp")
        assert [(e.path, e.format, e.phase, e.step) for e in m.exports] == [
            (str(tmp_path / "exp"), "hf", "sft", 6),
            (str(tmp_path / "exp2"), "hf", "base", 7),
        ]
        with pytest.raises(ValueError, match="model 'ghost' not found"):
            mr.record_export(s, "ghost", tmp_path / "x")
