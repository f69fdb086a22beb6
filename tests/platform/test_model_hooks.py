"""A job's model lands in the model registry through the real stages (run in-process with
`run_stage`, the trainer as its real subprocess): pretrain registers `job-<id8>` with its base
checkpoints, SFT adds its sft checkpoints to the same row, export records its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.pipeline import run_stage
from shared.db import model_registry as mr
from shared.db.session import session_scope
from shared.settings import get_settings

pytestmark = pytest.mark.slow


def _run(sessions, job_id, stage):
    return run_stage(
        job_id, stage, settings=get_settings(), sessions=sessions, worker_id="w1", enqueue=lambda j, st: None
    )


def test_pretrain_sft_export_register_one_model(sessions, submit, make_spec):
    spec = make_spec(
        kind="pipeline",
        stages=["data", "tokenizer", "pretrain", "sft", "export"],
        sft={"num_iterations": 2, "device_batch_size": 2},
    )
    job_id = submit(spec, enqueue=False)
    for stage in ("data", "tokenizer", "pretrain"):
        assert _run(sessions, job_id, stage) == "ran", stage
    name = f"job-{job_id[:8]}"
    with session_scope(sessions) as s:
        m = mr.require_model(s, name)
        run = get_settings().runs_dir / job_id
        assert (m.source, m.source_job_id, Path(m.path), m.checkpoint_tag) == ("job", job_id, run, "d2")
        assert m.tokenizer_path == str(run / "tokenizer") and m.vocab_size == 512
        assert mr.steps(m, "base") == [4, 8, 12] and mr.steps(m, "sft") == []
        assert mr.resolve_checkpoint(s, name, "base", None).checkpoint_dir == run / "base_checkpoints" / "d2"
    for stage in ("sft", "export"):
        assert _run(sessions, job_id, stage) == "ran", stage
    with session_scope(sessions) as s:
        assert [m.name for m in mr.list_models(s)] == [name]  # one model per job
        m = mr.require_model(s, name)
        assert mr.latest_steps(m) == {"base": 12, "sft": 2}
        ref = mr.resolve_checkpoint(s, name, "sft", None)
        assert (ref.step, ref.has_optimizer) == (2, True)
        assert [(e.path, e.phase, e.step, e.job_id) for e in m.exports] == [
            (str(run / "export"), "sft", 2, job_id)
        ]
