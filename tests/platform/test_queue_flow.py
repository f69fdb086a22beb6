"""Jobs through real Celery workers (`ncp worker` processes) over real Redis and PostgreSQL:
the happy path, duplicate delivery, and a Redis FLUSHDB that the reconciler recovers from."""

from __future__ import annotations

from pathlib import Path

from shared.db import registry
from shared.db.session import session_scope


def _status(sessions, job_id):
    with session_scope(sessions) as s:
        return registry.get_job(s, job_id).status


def _events(sessions, job_id):
    with session_scope(sessions) as s:
        return registry.list_events(s, job_id, limit=1000)


def _finished(sessions, job_id):
    status = _status(sessions, job_id)
    return status if status in ("succeeded", "failed", "cancelled") else None


def test_data_pipeline_through_workers(procs, sessions, submit, make_spec, waiter):
    procs.worker("data", "data")
    procs.worker("eval", "eval")
    job_id = submit(make_spec(stages=["data", "tokenizer"]))
    status = waiter(lambda: _finished(sessions, job_id), 90, what="job to finish")
    assert status == "succeeded", procs.log("data") + procs.log("eval")
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        stages = {st.name: st for st in job.stages}
        artifacts = {a.name: a.path for a in registry.list_artifacts(s, job_id)}
    assert [st.name for st in job.stages] == ["data", "tokenizer", "report"]
    assert all(st.status == "succeeded" for st in job.stages)
    assert Path(stages["tokenizer"].outputs["tokenizer_dir"], "tokenizer.json").is_file()
    report = Path(artifacts["report"])
    assert report.is_file() and "Run report" in report.read_text()
    # Each stage ran on its own queue's worker.
    assert "ncp.stage.tokenizer[" in procs.log("data") and "ncp.stage.report[" in procs.log("eval")
    assert "ncp.stage.report[" not in procs.log("data")


def test_duplicate_messages_and_two_workers_run_each_stage_once(procs, sessions, submit, make_spec, waiter):
    from shared.jobs.dispatch import enqueue_job

    job_id = submit(make_spec(stages=["data", "tokenizer"]))
    for _ in range(3):  # the API retried, the reconciler fired, a message was redelivered...
        enqueue_job(job_id)
    procs.worker("data-a", "data")
    procs.worker("data-b", "data")
    procs.worker("eval", "eval")
    assert waiter(lambda: _finished(sessions, job_id), 90, what="job to finish") == "succeeded"
    started = [e.stage for e in _events(sessions, job_id) if e.type == "stage_started"]
    assert started == ["data", "tokenizer", "report"]
    logs = procs.log("data-a") + procs.log("data-b")
    # Both workers got messages for this job; the extra ones were dropped, not run.
    assert logs.count(f"job {job_id} stage data: ran") == 1
    assert logs.count(f"job {job_id} stage data:") == 4


def test_redis_flushdb_loses_no_job(procs, sessions, submit, make_spec, waiter, redis_db):
    job_id = submit(make_spec(stages=["data", "tokenizer"]))
    # No worker yet: the first stage's message sits in Redis. Then Redis loses everything.
    assert redis_db.llen("data") == 1
    redis_db.flushdb()
    assert redis_db.llen("data") == 0
    procs.worker("data", "data")
    procs.worker("eval", "eval")
    procs.start("reconciler", "reconciler")
    assert waiter(lambda: _finished(sessions, job_id), 90, what="job to finish") == "succeeded"
    enqueued = [e for e in _events(sessions, job_id) if e.type == "enqueued" and e.stage == "data"]
    assert len(enqueued) >= 2  # the API's send, lost; the reconciler's, which ran
    assert f"job {job_id} requeued" in procs.log("reconciler")
    with session_scope(sessions) as s:
        assert registry.get_job(s, job_id).attempts == 0


def test_reconciler_leaves_jobs_waiting_in_redis_alone(sessions, submit, make_spec, redis_db):
    from services.worker.reconciler import ReconcileConfig, reconcile_once
    from shared.jobs.dispatch import enqueue_job, waiting_messages

    cfg = ReconcileConfig(max_attempts=3, grace_seconds=0, interval_seconds=1)
    job_id = submit(make_spec(stages=["data"]))  # no worker: the message waits in Redis

    def actions():
        done = reconcile_once(sessions, cfg, enqueue_job, waiting=waiting_messages)
        return [a.action for a in done if a.job_id == job_id]

    assert actions() == []  # still on its way: not re-sent
    assert redis_db.llen("data") == 1
    redis_db.flushdb()
    assert actions() == ["requeued"]  # lost: sent again, exactly once
    assert redis_db.llen("data") == 1
    assert actions() == []
