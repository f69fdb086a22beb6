"""A training stage that outlives the broker's visibility timeout (a 62-hour run against Redis'
6 hours): Redis hands the unacknowledged message to another worker while the first still trains.
The second delivery finds the job's lease held and drops the message; the stage runs once, the job
finishes once, every step is recorded once.

Real processes: two train workers and a data/eval worker over Redis and PostgreSQL, with a
visibility timeout of 2 seconds and a training stage of many seconds.
"""

from __future__ import annotations

import json

import pytest

from shared.db import registry
from shared.db.session import session_scope
from shared.paths import run_paths
from shared.settings import get_settings

pytestmark = pytest.mark.slow

SHORT = {"NCP_VISIBILITY_TIMEOUT_SECONDS": "2"}


def test_redelivered_training_message_does_no_harm(procs, sessions, submit, make_spec, waiter):
    procs.worker("data", "data,eval", env=SHORT)
    procs.worker("train-a", "train", env=SHORT)
    procs.worker("train-b", "train", env=SHORT)
    total = 200
    job_id = submit(make_spec(horizon={"num_iterations": total}, checkpoint={"every": 50}))

    def finished():
        with session_scope(sessions) as s:
            status = registry.get_job(s, job_id).status
        return status if status in ("succeeded", "failed", "cancelled") else None

    logs = lambda: procs.log("train-a") + procs.log("train-b")  # noqa: E731
    # The message comes back while the stage runs, and the other train worker drops it.
    waiter(lambda: f"job {job_id} stage pretrain: leased" in logs() or finished(), 300, what="a redelivery")
    assert waiter(finished, 300, what="job to finish") == "succeeded", logs()[-3000:]

    assert logs().count(f"job {job_id} stage pretrain: ran") == 1
    assert f"job {job_id} stage pretrain: leased" in logs()  # it was redelivered, and dropped
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        started = [e.stage for e in registry.list_events(s, job_id, limit=2000) if e.type == "stage_started"]
        steps = [m.step for m in registry.get_metrics(s, job_id, names=["loss"], stage="pretrain")]
    assert job.attempts == 0 and started == ["data", "tokenizer", "pretrain", "report"]
    assert steps == list(range(1, total + 1))
    run = run_paths(get_settings().runs_dir, job_id)
    assert (run.logs / "pretrain.log").read_text().count("launching:") == 1  # one trainer, ever
    lines = [json.loads(x) for x in run.progress_file.read_text().splitlines() if x.strip()]
    assert [r["step"] for r in lines if r["type"] == "progress"] == list(range(1, total + 1))
