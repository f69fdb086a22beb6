"""Stage orchestration and the reconciler against the real PostgreSQL registry, without Celery.

`run_stage` gets the real stage functions; what would be sent to the broker is collected by the
`enqueue` callback (the Celery path itself is covered in test_queue_flow.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from services.worker.pipeline import run_stage
from services.worker.reconciler import ReconcileConfig, reconcile_once
from shared.db import registry
from shared.db.session import session_scope
from shared.settings import get_settings


def _run(sessions, job_id, stage, worker="w1"):
    sent: list[tuple[str, str]] = []
    out = run_stage(
        job_id,
        stage,
        settings=get_settings(),
        sessions=sessions,
        worker_id=worker,
        enqueue=lambda j, st: sent.append((j, st)),
    )
    return out, sent


def _job(sessions, job_id):
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        return job, {st.name: st for st in job.stages}


def test_stage_runs_once_and_hands_over(sessions, submit, make_spec):
    job_id = submit(make_spec(stages=["data", "tokenizer"]), enqueue=False)
    out, sent = _run(sessions, job_id, "data")
    assert out == "ran"
    assert sent == [(job_id, "tokenizer")]
    job, stages = _job(sessions, job_id)
    assert job.status == "running" and stages["data"].status == "succeeded"
    data_dir = stages["data"].outputs["data_dir"]
    assert data_dir.endswith("demo-3") and stages["data"].outputs["report"]["num_shards"] == 3
    # The lease was released before the next stage was sent, so its worker can take the job.
    with session_scope(sessions) as s:
        assert registry.get_lease(s, job_id) is None

    # A redelivered "data" message: dropped as a duplicate, nothing more is sent.
    out, sent = _run(sessions, job_id, "data", worker="w2")
    assert out == "duplicate" and sent == []
    # A message for a stage whose predecessor has not run is dropped.
    out, sent = _run(sessions, job_id, "report")
    assert out == "out_of_order" and sent == []

    out, sent = _run(sessions, job_id, "tokenizer")
    assert out == "ran" and sent == [(job_id, "report")]
    _, stages = _job(sessions, job_id)
    tok = stages["tokenizer"].outputs
    assert tok["vocab_size"] == 512 and tok["bytes_per_token"] > 1.0
    # Redelivered tokenizer stage after success: nothing is retrained.
    assert _run(sessions, job_id, "tokenizer")[0] == "duplicate"
    with session_scope(sessions) as s:
        started = [e for e in registry.list_events(s, job_id, limit=1000) if e.type == "stage_started"]
    assert [e.stage for e in started] == ["data", "tokenizer"]


def test_lease_held_elsewhere_drops_message(sessions, submit, make_spec):
    job_id = submit(make_spec(stages=["data"]), enqueue=False)
    with session_scope(sessions) as s:
        assert registry.acquire_lease(s, job_id, "other-worker", 60)
    out, sent = _run(sessions, job_id, "data")
    assert out == "leased" and sent == []
    job, stages = _job(sessions, job_id)
    assert job.status == "queued" and stages["data"].status == "pending"


def test_cancel_before_start(sessions, submit, make_spec):
    job_id = submit(make_spec(stages=["data"]), enqueue=False)
    with session_scope(sessions) as s:
        # Simulates a cancel landing between lease and start: the worker holds a lease, so the
        # registry only flags it (cancelling) and the worker must finish the cancel.
        registry.acquire_lease(s, job_id, "w1", 60)
        assert registry.request_cancel(s, job_id).status == "cancelling"
    out, _ = _run(sessions, job_id, "data", worker="w1")
    assert out == "cancelled"
    job, stages = _job(sessions, job_id)
    assert job.status == "cancelled" and stages["data"].status == "cancelled"
    with session_scope(sessions) as s:
        assert registry.get_lease(s, job_id) is None


def test_stage_failure_is_recorded(sessions, submit, make_spec, platform_env):
    from pathlib import Path

    home = Path(platform_env["NCP_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "empty.txt").write_text("")  # a local corpus with no text at all
    job_id = submit(make_spec(stages=["data"], data={"source": "local", "path": "empty.txt"}), enqueue=False)
    out, sent = _run(sessions, job_id, "data")
    assert out == "failed" and sent == []
    job, stages = _job(sessions, job_id)
    assert job.status == "failed" and job.error_code == "stage_failed"
    assert "empty.txt" in stages["data"].error and "document" in stages["data"].error
    with session_scope(sessions) as s:
        assert registry.get_lease(s, job_id) is None


def test_reconciler_requeues_retries_and_gives_up(sessions, submit, make_spec):
    cfg = ReconcileConfig(max_attempts=2, grace_seconds=0, interval_seconds=1)
    sent: list[str] = []

    def enqueue(job_id):
        sent.append(job_id)
        return "data"

    lost = submit(make_spec(stages=["data"]), enqueue=False)  # its message never reached a broker
    crashed = submit(make_spec(stages=["data"]), enqueue=False)
    cancelling = submit(make_spec(stages=["data"]), enqueue=False)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    with session_scope(sessions) as s:
        registry.acquire_lease(s, crashed, "dead-worker", 1, now=past)
        registry.start_stage(s, crashed, "data")
        registry.acquire_lease(s, cancelling, "dead-too", 60)
        registry.request_cancel(s, cancelling)
        registry.acquire_lease(s, cancelling, "dead-too", 1, now=past)  # then it died

    actions = {a.job_id: a for a in reconcile_once(sessions, cfg, enqueue)}
    assert actions[lost].action == "requeued"
    assert actions[crashed].action == "retried"
    assert actions[cancelling].action == "cancelled"
    # (earlier tests of this module left jobs in the same database; only ours are checked)
    assert sorted(j for j in sent if j in (lost, crashed, cancelling)) == sorted([lost, crashed])
    with session_scope(sessions) as s:
        assert registry.get_job(s, lost).attempts == 0  # a lost message is not a failed attempt
        assert registry.get_job(s, crashed).attempts == 1
        assert registry.get_lease(s, crashed) is None  # the dead worker's lease was dropped
        assert registry.get_job(s, cancelling).status == "cancelled"

        # The retried worker dies too: the second expired lease exhausts max_attempts.
        registry.acquire_lease(s, crashed, "dead-again", 1, now=past)
    actions = {a.job_id: a for a in reconcile_once(sessions, cfg, enqueue)}
    assert actions[crashed].action == "failed"
    job, stages = _job(sessions, crashed)
    assert job.status == "failed" and job.error_code == "max_attempts" and job.attempts == 2
    assert stages["data"].status == "failed"


def test_reconciler_leaves_live_and_recent_jobs_alone(sessions, submit, make_spec):
    busy = submit(make_spec(stages=["data"]), enqueue=False)
    with session_scope(sessions) as s:
        registry.acquire_lease(s, busy, "alive", 60)
    fresh = submit(make_spec(stages=["data"]), enqueue=False)
    sent: list[str] = []
    cfg = ReconcileConfig(max_attempts=3, grace_seconds=30, interval_seconds=1)
    acted = {a.job_id for a in reconcile_once(sessions, cfg, lambda j: sent.append(j))}
    assert busy not in acted and fresh not in acted and busy not in sent and fresh not in sent


def test_job_stages_end_with_report():
    from shared.jobs.stages import first_unfinished, job_stages, next_stage

    assert job_stages(["base_eval"]) == ["base_eval", "report"]
    assert job_stages(["data", "tokenizer"]) == ["data", "tokenizer", "report"]
    assert next_stage(["data", "tokenizer"], "tokenizer") == "report"
    assert next_stage(["data", "tokenizer"], "report") is None
    assert first_unfinished(["data", "tokenizer"], {"data"}) == "tokenizer"
    assert first_unfinished(["data", "tokenizer"], {"data", "tokenizer", "report"}) is None


def test_multinode_without_cluster_fails_with_a_clear_error(sessions, submit, make_spec):
    job_id = submit(
        make_spec(
            stages=["pretrain"],
            hardware={"gpus": 1, "nodes": 2, "device": "cuda"},
            batch={"total_batch_size": 512},
        ),
        enqueue=False,
    )
    out, sent = _run(sessions, job_id, "pretrain")
    assert out == "failed" and sent == []
    job, stages = _job(sessions, job_id)
    assert job.status == "failed" and job.error_code == "multinode_unavailable"
    assert "NCP_K8S_TRAIN_IMAGE" in job.error_message


def test_heartbeat_notices_a_stolen_lease(sessions, submit, make_spec):
    from services.worker.heartbeat import LeaseHeartbeat

    job_id = submit(make_spec(stages=["data"]), enqueue=False)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    with session_scope(sessions) as s:
        assert registry.acquire_lease(s, job_id, "slow-worker", 1, now=past)  # already expired
        assert registry.acquire_lease(s, job_id, "new-owner", 60)  # the reconciler's new worker
    hb = LeaseHeartbeat(sessions, job_id, "slow-worker", ttl_seconds=0.6)
    with hb:
        assert hb.lost.wait(5)
    with session_scope(sessions) as s:
        assert registry.get_lease(s, job_id).worker_id == "new-owner"


def test_worker_cli_arguments():
    import pytest

    from services.cli.commands.worker import parse_queues, worker_argv

    assert parse_queues("data, eval") == ["data", "eval"]
    with pytest.raises(ValueError, match="--queues"):
        parse_queues("data,gpu")
    argv = worker_argv(["train"], 4, "INFO")
    assert argv[argv.index("-c") + 1] == "1"  # one training task at a time, whatever was asked
    assert argv[argv.index("-Q") + 1] == "train"
    argv = worker_argv(["data", "eval"], 3, "INFO")
    assert argv[argv.index("-c") + 1] == "3"


def test_local_corpus_with_a_link_out_of_the_roots_is_refused(
    sessions, submit, make_spec, platform_env, tmp_path
):
    """The corpus folder lies inside NCP_HOME, so the spec is accepted; one file in it is a link to
    a file elsewhere, and the data stage refuses to read it (before reading anything)."""
    from pathlib import Path

    home = Path(platform_env["NCP_HOME"])
    corpus = home / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("A perfectly ordinary document.\n" * 50)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN " * 100)
    (corpus / "b.txt").symlink_to(secret)
    job_id = submit(make_spec(stages=["data"], data={"source": "local", "path": "corpus"}), enqueue=False)
    out, _ = _run(sessions, job_id, "data")
    assert out == "failed"
    job, stages = _job(sessions, job_id)
    assert "b.txt" in stages["data"].error and "outside the allowed data roots" in stages["data"].error
    shards = list((home / "runs" / job_id / "data").glob("*.parquet"))
    assert not shards  # nothing was imported


def test_job_errors_never_carry_sql():
    from sqlalchemy.exc import DataError

    from services.worker.pipeline import error_text

    e = DataError(
        "INSERT INTO metrics (job_id, step) VALUES (%(job_id)s, %(step)s)",
        {"job_id": "j", "step": 3_000_000_000},
        Exception("integer out of range\nDETAIL: more"),
    )
    text = error_text(e)
    assert text == "registry error: Exception: integer out of range"
    assert "INSERT" not in text and "3000000000" not in text
    assert error_text(ValueError("a\x00b")) == "ValueError: a\\0b"


def test_checkpoint_listing_follows_retention_and_evals(sessions, submit, make_spec):
    """Retention deletes old checkpoints on disk: the registry drops them too; a checkpoint's
    val_bpb is an evaluation of its own step or nothing (never an older step's number)."""
    from shared.nanochat.checkpoint import list_checkpoints

    spec = make_spec(
        stages=["data", "tokenizer", "pretrain"],
        horizon={"num_iterations": 12},
        checkpoint={"every": 3, "keep_last": 2},
        eval={"every": 6},
    )
    job_id = submit(spec, enqueue=False)
    for stage in ("data", "tokenizer", "pretrain"):
        assert _run(sessions, job_id, stage)[0] == "ran", stage
    _, stages = _job(sessions, job_id)
    ckpt_dir = Path(stages["pretrain"].outputs["checkpoint_dir"])
    on_disk = sorted(c.step for c in list_checkpoints(ckpt_dir) if c.complete)
    with session_scope(sessions) as s:
        rows = {c.step: c for c in registry.list_checkpoints(s, job_id)}
        bpb = {m.step: m.value for m in registry.get_metrics(s, job_id, names=["val_bpb"])}
        removed = [e for e in registry.list_events(s, job_id, limit=1000) if e.type == "checkpoint_removed"]
    assert on_disk == [9, 12] and sorted(rows) == on_disk
    assert rows[12].val_bpb == bpb[12]  # evaluated at its own step (the last one)
    assert rows[9].val_bpb is None  # 9 was not evaluated; 6's number does not describe it
    assert removed and {s for e in removed for s in e.data["steps"]} == {3, 6}
