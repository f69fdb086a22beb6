"""Training through real `ncp worker` processes: cancel frees the process group, a SIGKILLed
worker's job resumes from its checkpoint on another worker with no duplicated steps, and a
cancelled job resumes where it stopped.

Tiny model (depth 2, head_dim 64, vocab 512, T 64) on the demo corpus; a step takes ~0.2 s on
two busy CPU cores.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from services.worker.launcher import group_alive
from shared.db import registry
from shared.db.session import session_scope
from shared.paths import run_paths
from shared.settings import get_settings

pytestmark = pytest.mark.slow


def _job(sessions, job_id):
    with session_scope(sessions) as s:
        return registry.get_job(s, job_id)


def _finished(sessions, job_id):
    status = _job(sessions, job_id).status
    return status if status in ("succeeded", "failed", "cancelled") else None


def _pgid(job_id) -> int | None:
    path = run_paths(get_settings().runs_dir, job_id).logs / "pretrain.pgid"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _progress(job_id) -> list[dict]:
    path = run_paths(get_settings().runs_dir, job_id).progress_file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metric_steps(sessions, job_id, name="loss"):
    with session_scope(sessions) as s:
        return [m.step for m in registry.get_metrics(s, job_id, names=[name], stage="pretrain")]


def test_cancel_mid_training_frees_the_process_group_then_resume(procs, sessions, submit, make_spec, waiter):
    procs.worker("data", "data,eval")
    procs.worker("train", "train")
    # Long enough that the cancel lands mid-run however fast this machine trains the tiny model.
    total = 400
    job_id = submit(make_spec(horizon={"num_iterations": total}, checkpoint={"every": 0}))
    waiter(lambda: (_job(sessions, job_id).step or 0) >= 3, 120, what="training to report step 3")
    pgid = _pgid(job_id)
    assert pgid is not None and group_alive(pgid)

    with session_scope(sessions) as s:
        assert registry.request_cancel(s, job_id).status == "cancelling"
    t0 = time.monotonic()
    assert waiter(lambda: _finished(sessions, job_id), 30, 0.1, what="cancel") == "cancelled"
    took = time.monotonic() - t0
    # When the job says cancelled, the trainer's whole process group is gone.
    assert not group_alive(pgid)
    assert took < 15, f"cancel took {took:.1f}s"
    job = _job(sessions, job_id)
    stopped_at = job.step
    assert stopped_at < total
    done = [r for r in _progress(job_id) if r["type"] == "done"]
    assert done and done[-1]["stopped"] is True  # cooperative stop: it saved a checkpoint first
    with session_scope(sessions) as s:
        ckpts = [c.step for c in registry.list_checkpoints(s, job_id)]
        assert ckpts and max(ckpts) >= stopped_at

    # Resume (what POST /jobs/{id}/resume does): training continues from the stop checkpoint.
    from shared.jobs.dispatch import enqueue_job

    with session_scope(sessions) as s:
        registry.resume_job(s, job_id)
    enqueue_job(job_id)
    assert waiter(lambda: _finished(sessions, job_id), 120, what="resumed job") == "succeeded"
    with session_scope(sessions) as s:
        pre = registry.get_stage(s, job_id, "pretrain").outputs
    assert pre["resumed_from"] == max(ckpts) and pre["step"] == total
    steps = _metric_steps(sessions, job_id)
    assert steps == list(range(1, total + 1))


def test_worker_killed_mid_run_resumes_from_checkpoint(procs, sessions, submit, make_spec, waiter):
    procs.worker("data", "data,eval")
    procs.worker("train-1", "train")
    procs.start("reconciler", "reconciler")
    # Long enough that the kill lands mid-run however fast this machine trains the tiny model.
    total = 160
    job_id = submit(make_spec(horizon={"num_iterations": total}, checkpoint={"every": 16}))

    def has_checkpoint():
        with session_scope(sessions) as s:
            return any(c.step >= 32 for c in registry.list_checkpoints(s, job_id))

    waiter(has_checkpoint, 150, what="a checkpoint at step >= 32")
    pgid = _pgid(job_id)
    assert pgid is not None
    procs.kill("train-1", signal.SIGKILL)  # the worker and its pool die at once, no cleanup
    # The trainer does not outlive its worker (PR_SET_PDEATHSIG), so it cannot race the next attempt.
    waiter(lambda: not group_alive(pgid), 10, 0.1, what="the orphaned trainer to die")
    # Progress lines the first attempt wrote; the second attempt's lines follow them in the file.
    first_attempt_lines = sum(1 for r in _progress(job_id) if r["type"] == "progress")
    # What the retry must resume from: the newest checkpoint complete on disk when the worker died.
    # (The registry's step lags the trainer by up to one forwarding interval, so it is no bound.)
    from shared.nanochat.checkpoint import latest_step

    ckpt_root = run_paths(get_settings().runs_dir, job_id).root / "base_checkpoints"
    newest_on_disk = max(latest_step(d) or 0 for d in ckpt_root.iterdir())

    procs.worker("train-2", "train")
    assert waiter(lambda: _finished(sessions, job_id), 150, what="job to finish") == "succeeded", procs.log(
        "train-2"
    )[-3000:]
    job = _job(sessions, job_id)
    assert job.attempts == 1
    with session_scope(sessions) as s:
        pre = registry.get_stage(s, job_id, "pretrain").outputs
        ckpts = sorted(c.step for c in registry.list_checkpoints(s, job_id, kind="base"))
        events = [e.type for e in registry.list_events(s, job_id, limit=1000)]
    resumed_from = pre["resumed_from"]
    assert resumed_from == newest_on_disk and 32 <= resumed_from < total
    assert pre["step"] == total
    assert ckpts == list(range(16, total + 1, 16))  # each checkpoint once, none lost
    assert "retry" in events and "resume" in events
    # One metric row per step, 1..total: the steps the second attempt repeated were not re-recorded.
    assert _metric_steps(sessions, job_id) == list(range(1, total + 1))
    # The trainer's own log shows continuation: the second attempt started right after the checkpoint.
    progress_steps = [r["step"] for r in _progress(job_id) if r["type"] == "progress"]
    # (Indexing by line count, not by a step going backwards: the kill can land right after the
    # checkpoint's own step, and then no step repeats.)
    assert progress_steps[first_attempt_lines] == resumed_from + 1
    assert progress_steps[-1] == total
    assert f"job {job_id} retried" in procs.log("reconciler")
    assert (
        Path(run_paths(get_settings().runs_dir, job_id).logs / "pretrain.log").read_text().count("launching:")
        == 2
    )

    # A follow-up eval job on this model (parent_job_id): it reads the parent's run folder and
    # writes its own results.
    from shared.jobs.spec import JobSpec

    spec = {
        "kind": "eval",
        "parent_job_id": job_id,
        "eval": {"tokens": 1024, "core_max_per_task": 2},
        "hardware": {"gpus": 0, "device": "cpu"},
    }
    JobSpec.model_validate(spec)
    child = submit(spec)
    assert waiter(lambda: _finished(sessions, child), 120, what="eval job") == "succeeded"
    with session_scope(sessions) as s:
        ev = registry.get_stage(s, child, "base_eval").outputs
    assert ev["step"] == total and ev["results"]["val_bpb"] > 0
    assert Path(ev["out_dir"]).is_relative_to(run_paths(get_settings().runs_dir, child).root)
