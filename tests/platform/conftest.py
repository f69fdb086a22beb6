"""Platform test fixtures: a fresh PostgreSQL database per module, a dedicated Redis DB, and real
`ncp worker` / `ncp reconciler` processes.

Everything here is real: the registry is PostgreSQL (migrated with the project's Alembic
migrations), the broker is Redis, and workers are separate processes started with the `ncp` CLI,
so killing one with SIGKILL is a real worker crash.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
import redis

from tests.processes import Procs
from tests.servers import PG_ADMIN, redis_url
from tests.servers import pg_url as pg_address
from tests.tiny import tiny_spec
from tests.waiting import wait_for

# A Redis DB of its own: other areas' tests and developers use DB 0.
REDIS_DB = 13
REDIS_URL = redis_url(REDIS_DB)


@pytest.fixture(scope="module")
def pg_url():
    name = f"ncp_platform_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_address(name)
    from services.api.migrate import upgrade

    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_db():
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture
def platform_env(tmp_path, pg_url, redis_db, monkeypatch):
    """NCP_* settings shared by this test and the processes it starts."""
    home = tmp_path / "ncp_home"
    env = {
        "NCP_HOME": str(home),
        "NCP_DATABASE_URL": pg_url,
        "NCP_BROKER_URL": REDIS_URL,
        "NCP_LEASE_SECONDS": "4",
        "NCP_RECONCILE_INTERVAL_SECONDS": "1",
        "NCP_CANCEL_GRACE_SECONDS": "5",
        "NCP_MAX_ATTEMPTS": "3",
        "NCP_DEMO_CORPUS_BYTES": "300000",
        "NCP_LOG_LEVEL": "INFO",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from shared.settings import get_settings

    get_settings.cache_clear()
    return env


@pytest.fixture
def procs(platform_env, tmp_path):
    p = Procs(platform_env, tmp_path / "proc_logs")
    yield p
    p.stop_all()


@pytest.fixture
def sessions(platform_env):
    from shared.db.session import make_engine, make_session_factory

    engine = make_engine(platform_env["NCP_DATABASE_URL"])
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def waiter():
    return wait_for


@pytest.fixture
def make_spec():
    return tiny_spec


@pytest.fixture
def submit(sessions):
    """Create a job the way the API does (validated spec, registry row) and enqueue it."""

    def _submit(spec: dict, enqueue: bool = True) -> str:
        from shared.db import registry
        from shared.db.session import session_scope
        from shared.jobs.dispatch import enqueue_job
        from shared.jobs.spec import JobSpec

        validated = JobSpec.model_validate(spec)
        with session_scope(sessions) as s:
            job = registry.create_job(s, validated)
        if enqueue:
            enqueue_job(job.id)
        return job.id

    return _submit


@pytest.fixture
def job_succeeds(sessions, procs):
    """job_succeeds(job_id, timeout, *logs): wait until the job ends; unless it succeeded, fail
    with each stage's status and error and the tail of the named worker logs."""

    def _wait(job_id: str, timeout: float, *logs: str) -> None:
        from shared.db import registry
        from shared.db.models import TERMINAL_STATUSES
        from shared.db.session import session_scope

        def finished() -> str | None:
            with session_scope(sessions) as s:
                status = registry.get_job(s, job_id).status
            return status if status in TERMINAL_STATUSES else None

        status = wait_for(finished, timeout, 0.3, what=f"job {job_id}")
        if status != "succeeded":
            with session_scope(sessions) as s:
                detail = {st.name: (st.status, st.error) for st in registry.get_job(s, job_id).stages}
            tails = "".join(f"\n{procs.log(name)[-3000:]}" for name in logs)
            raise AssertionError(f"{job_id} {status}: {detail}{tails}")

    return _wait
