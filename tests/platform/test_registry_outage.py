"""The registry goes away mid-training for longer than a worker lease, then comes back.

Real processes throughout: `ncp worker`s and the reconciler against a PostgreSQL server of this
test's own (stopped with pg_ctl; the machine's shared server is never touched) and Redis. The
trainer must keep training through the outage, and the job must finish on its first attempt with
every step recorded exactly once.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from shared.db import registry
from shared.db.session import session_scope
from shared.paths import run_paths
from shared.settings import get_settings
from tests.private_postgres import PrivatePostgres

pytestmark = pytest.mark.slow

LEASE_SECONDS = 4  # platform_env's NCP_LEASE_SECONDS


@pytest.fixture(scope="module")
def private_pg():
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def pg_url(private_pg):
    """Overrides the shared-server database of tests/platform/conftest.py for this module."""
    from services.api.migrate import upgrade

    url = private_pg.create_database(f"ncp_outage_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    return url


def _steps_written(job_id: str) -> list[int]:
    path = run_paths(get_settings().runs_dir, job_id).progress_file
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["step"] for r in lines if r["type"] == "progress"]


def test_training_survives_a_registry_outage(private_pg, procs, sessions, submit, make_spec, waiter):
    procs.worker("data", "data,eval")
    procs.worker("train", "train")
    procs.start("reconciler", "reconciler")
    total = 1000  # ~20 s of training on an idle 2-core machine: the 8 s outage lies well inside it
    job_id = submit(make_spec(horizon={"num_iterations": total}, checkpoint={"every": 250, "keep_last": 3}))

    def step() -> int:
        with session_scope(sessions) as s:
            return registry.get_job(s, job_id).step or 0

    # Training has started and its first steps reached the registry.
    waiter(lambda: step() >= 1 and len(_steps_written(job_id)) >= 3, 180, what="training to report steps")
    sessions.kw["bind"].dispose()  # drop our pooled connections before the server goes

    private_pg.stop()
    down_at = time.monotonic()
    at_stop = len(_steps_written(job_id))
    # Down for two leases, and long enough that the trainer visibly kept training meanwhile.
    waiter(
        lambda: (
            time.monotonic() - down_at > 2 * LEASE_SECONDS and len(_steps_written(job_id)) >= at_stop + 10
        ),
        120,
        what="the trainer to keep training while the registry is down",
    )
    assert len(_steps_written(job_id)) < total, "the outage must overlap training"
    private_pg.start()

    def finished():
        with session_scope(sessions) as s:
            status = registry.get_job(s, job_id).status
        return status if status in ("succeeded", "failed", "cancelled") else None

    assert waiter(finished, 300, what="job to finish") == "succeeded", procs.log("train")[-3000:]
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        events = [e.type for e in registry.list_events(s, job_id, limit=2000)]
        steps = [m.step for m in registry.get_metrics(s, job_id, names=["loss"], stage="pretrain")]
        ckpts = sorted(c.step for c in registry.list_checkpoints(s, job_id, kind="base"))
        outputs = registry.get_stage(s, job_id, "pretrain").outputs
    assert job.attempts == 0 and "retry" not in events and "resume" not in events
    assert steps == list(range(1, total + 1))  # none lost, none twice
    assert ckpts == [500, 750, 1000] and outputs["step"] == total and outputs["resumed_from"] is None
    assert _steps_written(job_id) == list(range(1, total + 1))  # one attempt trained every step once
    log = (run_paths(get_settings().runs_dir, job_id).logs / "pretrain.log").read_text()
    assert log.count("launching:") == 1
    assert "registry unreachable" in procs.log("train")  # the outage was seen, and survived


def test_a_stage_that_loses_the_registry_runs_again_instead_of_failing(
    private_pg, sessions, submit, make_spec
):
    """A Postgres restart while a non-training stage reads the registry (seen in the compose e2e:
    base_eval failed the job with 'registry error: OperationalError'): the stage is released as
    interrupted, for the reconciler to send again, and neither it nor the job fails."""
    import threading

    from services.worker import pipeline
    from shared.settings import get_settings

    job_id = submit(make_spec(stages=["data", "tokenizer"]), enqueue=False)

    def run(stage: str) -> str:
        return pipeline.run_stage(
            job_id,
            stage,
            settings=get_settings(),
            sessions=sessions,
            worker_id="test-worker",
            enqueue=lambda *_: None,
        )

    assert run("data") == "ran"
    # The tokenizer stage's first registry read (the data stage's outputs) meets the outage.
    real_stage = pipeline.STAGE_FUNCTIONS["tokenizer"]

    def stage_during_an_outage(ctx):
        private_pg.stop()  # the real server goes away while the stage runs
        threading.Timer(3.0, private_pg.start).start()  # and comes back, so the result can be recorded
        return real_stage(ctx)

    pipeline.STAGE_FUNCTIONS["tokenizer"] = stage_during_an_outage
    try:
        out = run("tokenizer")
    finally:
        pipeline.STAGE_FUNCTIONS["tokenizer"] = real_stage
    assert out == "interrupted"
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        stage = registry.get_stage(s, job_id, "tokenizer")
        events = registry.list_events(s, job_id, limit=100)
    assert job.status not in ("failed",) and stage.status != "failed", (job.status, stage.status, stage.error)
    interrupted = [e.message for e in events if e.type == "interrupted"]
    assert interrupted and "registry was unreachable" in interrupted[0], [e.message for e in events]
