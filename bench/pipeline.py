"""Orchestration benchmark: what the queue costs per job, per broker.

Run: .venv/bin/python bench/pipeline.py [--jobs 8]

Each job runs two stages (`data` on the demo corpus, already built, and the closing `report`),
sequentially, one job at a time. Measured in the same run:

- reference: the same stages called in-process with `run_stage` (registry writes, no broker);
- Redis broker + PostgreSQL registry, one real `ncp worker --queues data,eval` process;
- the embedded defaults: kombu's SQLite broker + SQLite registry, same worker command.

Latency is submit -> job succeeded as seen in the registry; the ratio is against the reference,
and "overhead/stage" is what the broker path adds per stage hand-over.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_URL = "redis://127.0.0.1:6379/14"
SPEC = {
    "kind": "pretrain", "stages": ["data"], "data": {"source": "demo", "num_shards": 3},
    "model": {"depth": 2, "head_dim": 64, "vocab_size": 512, "sequence_len": 64},
    "hardware": {"gpus": 0, "device": "cpu"},
}  # fmt: skip


def _env(home: Path, db_url: str | None, broker: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update({"NCP_HOME": str(home), "NCP_DEMO_CORPUS_BYTES": "300000", "OMP_NUM_THREADS": "1"})
    if db_url:
        env["NCP_DATABASE_URL"] = db_url
    if broker:
        env["NCP_BROKER_URL"] = broker
    return env


def _apply(env: dict[str, str]) -> None:
    for k in [k for k in os.environ if k.startswith("NCP_")]:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith("NCP_")})
    from shared.settings import get_settings

    get_settings.cache_clear()


def _create(sessions) -> str:
    from shared.db import registry
    from shared.db.session import session_scope
    from shared.jobs.spec import JobSpec

    with session_scope(sessions) as s:
        return registry.create_job(s, JobSpec.model_validate(SPEC)).id


def _status(sessions, job_id: str) -> str:
    from shared.db import registry
    from shared.db.session import session_scope

    with session_scope(sessions) as s:
        return registry.get_job(s, job_id).status


def run_inprocess(env: dict[str, str], jobs: int) -> list[float]:
    from services.worker.pipeline import run_stage
    from shared.db.session import cached_session_factory as sessions_for
    from shared.settings import get_settings

    _apply(env)
    settings = get_settings()
    sessions = sessions_for(settings)
    out = []
    for i in range(jobs + 1):
        t0 = time.perf_counter()
        job_id = _create(sessions)
        for stage in ("data", "report"):
            assert (
                run_stage(
                    job_id,
                    stage,
                    settings=settings,
                    sessions=sessions,
                    worker_id="bench",
                    enqueue=lambda j, s: None,
                )
                == "ran"
            )
        assert _status(sessions, job_id) == "succeeded"
        if i:  # the first job pays one-time imports (matplotlib for the report)
            out.append(time.perf_counter() - t0)
    return out


def run_celery(env: dict[str, str], jobs: int, log: Path) -> list[float]:
    from shared.db.session import cached_session_factory as sessions_for
    from shared.jobs.dispatch import enqueue_job
    from shared.settings import get_settings

    _apply(env)
    sessions = sessions_for(get_settings())
    with open(log, "wb") as out_log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "worker", "--queues", "data,eval"],
            cwd=ROOT,
            env=env,
            stdout=out_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        out = []
        for i in range(jobs + 1):
            t0 = time.perf_counter()
            job_id = _create(sessions)
            enqueue_job(job_id)
            while (status := _status(sessions, job_id)) not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.02)
            assert status == "succeeded", log.read_text()[-2000:]
            if i:  # the first job waits for the worker to start
                out.append(time.perf_counter() - t0)
        return out
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    from services.api.migrate import upgrade

    tmp = Path(tempfile.mkdtemp(prefix="ncp-bench-pipeline-"))
    name = f"ncp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    pg = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    try:
        upgrade(pg)
        sqlite_home = tmp / "embedded"
        sqlite_db = f"sqlite:///{sqlite_home / 'registry.db'}"
        sqlite_home.mkdir(parents=True)
        upgrade(sqlite_db)
        rows = [
            ("in-process run_stage (reference)", run_inprocess(_env(tmp / "ref", pg, REDIS_URL), args.jobs)),
            (
                "Celery: Redis + PostgreSQL",
                run_celery(_env(tmp / "redis", pg, REDIS_URL), args.jobs, tmp / "w-redis.log"),
            ),
            (
                "Celery: SQLite broker + SQLite (embedded)",
                run_celery(_env(sqlite_home, None, None), args.jobs, tmp / "w-sqlite.log"),
            ),
        ]
    finally:
        r.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    ref = statistics.median(rows[0][1])
    print(f"jobs per mode: {args.jobs} (2 stages each: data on the cached demo corpus, report)")
    print(f"{'mode':<44} {'p50 s':>8} {'max s':>8} {'ratio':>7} {'overhead/stage s':>17}")
    for label, xs in rows:
        p50 = statistics.median(xs)
        print(f"{label:<44} {p50:8.3f} {max(xs):8.3f} {p50 / ref:7.2f} {(p50 - ref) / 2:17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
