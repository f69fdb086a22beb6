"""Registry functions against the real PostgreSQL and a SQLite file (each test runs on both)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from shared.db import registry as r
from shared.db.models import utcnow
from shared.db.session import make_engine, make_session_factory
from shared.jobs.spec import demo_spec


def _race(db_url: str, n: int, fn) -> list:
    """Run fn(session) in n threads, each with its own engine (own connections), released together."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def worker(i: int) -> None:
        engine = make_engine(db_url)
        try:
            with make_session_factory(engine)() as s:
                barrier.wait()
                results[i] = fn(s, i)
        except Exception as e:  # surfaced below; a thread must not swallow a failure
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_create_and_idempotency(sessions):
    with sessions() as s:
        job, created = r.create_or_get_job(s, demo_spec(), "key-1")
        assert created and job.status == "queued" and job.kind == "pipeline"
        assert [st.name for st in job.stages] == demo_spec().stages
        again, created2 = r.create_or_get_job(s, demo_spec(), "key-1")
        assert again.id == job.id and not created2
        with pytest.raises(r.IdempotencyConflict):
            r.create_job(s, demo_spec(seed=7), "key-1")
        other = r.create_job(s, demo_spec(), "key-2")
        assert other.id != job.id
        assert r.create_job(s, demo_spec()).id not in (job.id, other.id)


def test_idempotency_race_creates_one_job(db_url):
    spec = demo_spec()
    ids = _race(db_url, 4, lambda s, i: r.create_job(s, spec, "same-key").id)
    assert len(set(ids)) == 1


def test_transitions(sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        with pytest.raises(r.IllegalTransition):
            r.set_job_status(s, jid, "succeeded")  # queued -> succeeded skips running
        job = r.set_job_status(s, jid, "running")
        assert job.started_at is not None
        r.set_job_status(s, jid, "running")  # same status: allowed (redelivered task)
        job = r.set_job_status(s, jid, "succeeded")
        assert job.finished_at is not None and job.is_terminal
        assert all(st.status == "skipped" for st in job.stages)
        for target in ("running", "queued", "failed", "cancelled"):
            with pytest.raises(r.IllegalTransition):
                r.set_job_status(s, jid, target)
        with pytest.raises(ValueError):
            r.set_job_status(s, jid, "exploded")
        with pytest.raises(r.JobNotFound):
            r.get_job(s, "no-such-job")


def test_stage_lifecycle_and_progress(sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        r.start_stage(s, jid, "data")
        job = r.get_job(s, jid)
        assert job.status == "running" and job.current_stage == "data"
        r.finish_stage(s, jid, "data", {"shards": 4})
        r.start_stage(s, jid, "pretrain")
        r.update_progress(
            s,
            jid,
            step=10,
            total_steps=40,
            loss=3.5,
            tokens_per_sec=1234.0,
            mfu=0.1,
            eta_seconds=30.0,
            peak_memory_bytes=2**30,
        )
        job = r.get_job(s, jid)
        assert (job.step, job.total_steps, job.loss, job.peak_memory) == (10, 40, 3.5, 2**30)
        with pytest.raises(ValueError, match="bogus"):
            r.update_progress(s, jid, bogus=1)
        stage = r.fail_stage(s, jid, "pretrain", "CUDA out of memory", error_code="oom")
        assert stage.status == "failed" and stage.error == "CUDA out of memory"
        job = r.get_job(s, jid)
        assert job.status == "failed" and job.error_code == "oom" and "pretrain" in job.error_message
        statuses = {st.name: st.status for st in job.stages}
        assert statuses["data"] == "succeeded" and statuses["sft"] == "cancelled"
        types = [e.type for e in r.list_events(s, jid)]
        assert types[0] == "created" and "stage_failed" in types and types[-1] == "status"


def test_event_seq_is_unique_under_concurrency(db_url, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
    _race(db_url, 4, lambda s, i: [r.add_event(s, jid, "log", f"w{i} m{k}") for k in range(10)])
    with sessions() as s:
        seqs = [e.seq for e in r.list_events(s, jid, limit=1000)]
    assert seqs == list(range(1, 42))  # 1 "created" + 40 added, no gaps, no duplicates
    with sessions() as s:
        assert [e.seq for e in r.list_events(s, jid, after_seq=38)] == [39, 40, 41]


def test_metrics_checkpoints_artifacts_evals(sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        for step in range(3):
            assert (
                r.add_metrics(s, jid, "pretrain", step, {"loss": 4.0 - step, "lr": None, "flag": True}) == 1
            )
        r.add_metrics(s, jid, "pretrain", 2, {"val_bpb": 1.9})
        assert [m.value for m in r.get_metrics(s, jid, names=["loss"])] == [4.0, 3.0, 2.0]
        assert [m.step for m in r.get_metrics(s, jid, after_step=1)] == [2, 2]

        r.record_checkpoint(s, jid, "pretrain", 10, "/ck/10", "base", val_bpb=2.0, files=["model_000010.pt"])
        r.record_checkpoint(s, jid, "pretrain", 20, "/ck/20", "base")
        r.record_checkpoint(s, jid, "pretrain", 20, "/ck/20b", "base", val_bpb=1.5)  # re-save: update
        assert [(c.step, c.path) for c in r.list_checkpoints(s, jid)] == [(10, "/ck/10"), (20, "/ck/20b")]
        latest = r.latest_checkpoint(s, jid)
        assert latest is not None and latest.step == 20 and latest.val_bpb == 1.5
        with pytest.raises(ValueError):
            r.record_checkpoint(s, jid, "pretrain", 1, "/x", "lora")
        bare = r.create_job(s, demo_spec()).id
        newest = r.latest_checkpoints(s, [jid, bare, "missing"])
        assert set(newest) == {jid} and newest[jid].step == 20
        assert r.latest_checkpoints(s, []) == {}

        r.record_artifact(s, jid, "tokenizer", "/t", "tokenizer")
        r.record_artifact(s, jid, "tokenizer", "/t2", "tokenizer")
        assert [(a.name, a.path) for a in r.list_artifacts(s, jid)] == [("tokenizer", "/t2")]

        n = r.record_eval_results(s, jid, "base_eval", 20, {"core": {"centered": 0.1}, "hellaswag": 0.3})
        assert n == 2
        r.record_eval_results(s, jid, "base_eval", 20, {"core": {"centered": 0.2}})  # replaces step 20
        rows = r.list_eval_results(s, jid)
        assert [(x.task, x.metric, x.value) for x in rows] == [("core", "centered", 0.2)]
        with pytest.raises(r.JobNotFound):
            r.add_metrics(s, "missing", "pretrain", 1, {"loss": 1.0})


def test_cancel_and_resume(sessions):
    with sessions() as s:
        # Queued, nobody working on it: cancelled at once.
        jid = r.create_job(s, demo_spec()).id
        job = r.request_cancel(s, jid)
        assert job.status == "cancelled" and job.cancel_requested and job.finished_at is not None
        with pytest.raises(r.IllegalTransition):
            r.request_cancel(s, jid)
        job = r.resume_job(s, jid)
        assert job.status == "queued" and not job.cancel_requested and job.finished_at is None
        with pytest.raises(r.IllegalTransition):
            r.resume_job(s, jid)  # only cancelled/failed jobs resume

        # Running under a live lease: the worker is asked to stop.
        assert r.acquire_lease(s, jid, "w1", 60)
        r.start_stage(s, jid, "data")
        r.finish_stage(s, jid, "data")
        r.start_stage(s, jid, "pretrain")
        job = r.request_cancel(s, jid)
        assert job.status == "cancelling" and job.cancel_requested
        r.set_job_status(s, jid, "cancelled")
        r.release_lease(s, jid, "w1")
        job = r.resume_job(s, jid)
        stages = {st.name: st.status for st in job.stages}
        assert stages["data"] == "succeeded" and stages["pretrain"] == "pending"


def test_lease_race_has_one_winner(db_url, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
    wins = _race(db_url, 6, lambda s, i: r.acquire_lease(s, jid, f"worker-{i}", 60))
    assert sum(wins) == 1
    winner = f"worker-{wins.index(True)}"
    with sessions() as s:
        lease = r.get_lease(s, jid)
        assert lease is not None and lease.worker_id == winner
        loser = "worker-x"
        assert not r.renew_lease(s, jid, loser, 60)
        assert not r.release_lease(s, jid, loser)
        assert r.renew_lease(s, jid, winner, 60)
        assert r.acquire_lease(s, jid, winner, 60)  # re-acquiring our own lease is fine


def test_expired_lease_race_has_one_taker(db_url, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        past = utcnow() - dt.timedelta(seconds=600)
        assert r.acquire_lease(s, jid, "dead-worker", 60, now=past)  # expired 9 minutes ago
    wins = _race(db_url, 4, lambda s, i: r.acquire_lease(s, jid, f"w{i}", 60))
    assert sum(wins) == 1
    with sessions() as s:
        assert not r.renew_lease(s, jid, "dead-worker", 60)  # the old holder lost it
        assert r.get_lease(s, jid).worker_id == f"w{wins.index(True)}"
        with pytest.raises(r.JobNotFound):
            r.acquire_lease(s, "no-such-job", "w", 60)


def test_jobs_needing_reconcile(sessions):
    with sessions() as s:
        now = utcnow()
        orphan = r.create_job(s, demo_spec()).id  # queued, no lease
        held = r.create_job(s, demo_spec()).id
        r.acquire_lease(s, held, "alive", 120)
        r.start_stage(s, held, "data")
        dead = r.create_job(s, demo_spec()).id
        r.acquire_lease(s, dead, "gone", 10, now=now - dt.timedelta(seconds=60))
        r.start_stage(s, dead, "data")
        finished = r.create_job(s, demo_spec()).id
        r.request_cancel(s, finished)
        cancelling = r.create_job(s, demo_spec()).id
        r.acquire_lease(s, cancelling, "c", 10, now=now - dt.timedelta(seconds=20))  # expired 10 s ago
        r.start_stage(s, cancelling, "data")
        job = r.request_cancel(s, cancelling, now=now - dt.timedelta(seconds=15))  # lease was live then
        assert job.status == "cancelling"

        ids = {j.id for j in r.jobs_needing_reconcile(s)}
        assert ids == {orphan, dead}
        ids = {j.id for j in r.jobs_needing_reconcile(s, statuses=("queued", "running", "cancelling"))}
        assert ids == {orphan, dead, cancelling}
        # A job updated just now is left alone inside the grace period.
        assert r.jobs_needing_reconcile(s, grace_seconds=3600) == []


def test_increment_attempts_is_atomic(db_url, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
    got = _race(db_url, 4, lambda s, i: [r.increment_attempts(s, jid) for _ in range(5)])
    assert sorted(x for xs in got for x in xs) == list(range(1, 21))


def test_list_jobs_pagination(sessions):
    with sessions() as s:
        ids = [r.create_job(s, demo_spec()).id for _ in range(7)]
        r.request_cancel(s, ids[0])
        seen, cursor = [], None
        while True:
            page, cursor = r.list_jobs(s, cursor=cursor, limit=3)
            seen += [j.id for j in page]
            if cursor is None:
                break
        assert seen == list(reversed(ids))  # newest first, every job exactly once
        cancelled, _ = r.list_jobs(s, status="cancelled")
        assert [j.id for j in cancelled] == [ids[0]]
        assert len(r.list_jobs(s, status=["queued", "cancelled"])[0]) == 7
        with pytest.raises(ValueError, match="cursor"):
            r.list_jobs(s, cursor="not-a-cursor")
        with pytest.raises(ValueError, match="status"):
            r.list_jobs(s, status="sleeping")
        assert r.count_jobs_by_status(s)["queued"] == 6


def test_concurrent_checkpoint_and_artifact_upserts_keep_one_row(db_url, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
    _race(
        db_url,
        4,
        lambda s, i: (
            r.record_checkpoint(s, jid, "pretrain", 50, f"/ck/{i}", "base"),
            r.record_artifact(s, jid, "export", f"/ex/{i}", "export"),
        ),
    )
    with sessions() as s:
        assert [c.step for c in r.list_checkpoints(s, jid)] == [50]
        assert [a.name for a in r.list_artifacts(s, jid)] == ["export"]
        with pytest.raises(r.JobNotFound):
            r.record_checkpoint(s, "missing", "pretrain", 1, "/x")
        with pytest.raises(r.JobNotFound):
            r.record_artifact(s, "missing", "a", "/x", "export")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_random_operation_sequences_keep_job_invariants(sessions):
    """Whatever order workers, the API and the reconciler act in, a job's row stays coherent."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from shared.db.models import JOB_STATUSES, TERMINAL_STATUSES

    ops = st.lists(
        st.one_of(
            st.tuples(st.just("status"), st.sampled_from(JOB_STATUSES)),
            st.tuples(st.just("cancel"), st.none()),
            st.tuples(st.just("resume"), st.none()),
            st.tuples(st.just("stage"), st.sampled_from(["data", "pretrain"])),
            st.tuples(st.just("lease"), st.booleans()),
        ),
        max_size=12,
    )

    @settings(max_examples=30, deadline=None)
    @given(ops)
    def run(seq):
        with sessions() as s:
            jid = r.create_job(s, demo_spec()).id
            for op, arg in seq:
                before = r.get_job(s, jid).status
                try:
                    if op == "status":
                        r.set_job_status(s, jid, arg)
                    elif op == "cancel":
                        r.request_cancel(s, jid)
                    elif op == "resume":
                        r.resume_job(s, jid)
                    elif op == "stage":
                        r.start_stage(s, jid, arg)
                    elif arg:
                        r.acquire_lease(s, jid, "w", 60)
                    else:
                        r.release_lease(s, jid, "w")
                except r.IllegalTransition:
                    assert r.get_job(s, jid).status == before  # a refusal changes nothing
                    continue
                job = r.get_job(s, jid)
                assert job.status in JOB_STATUSES
                assert (job.finished_at is not None) == (job.status in TERMINAL_STATUSES)
                if job.status in TERMINAL_STATUSES:
                    assert not any(st_.status in ("pending", "running") for st_ in job.stages)
                if job.status in ("running", "cancelling"):
                    assert job.started_at is not None or op != "stage"
            seqs = [e.seq for e in r.list_events(s, jid, limit=1000)]
            assert seqs == list(range(1, len(seqs) + 1))

    run()
