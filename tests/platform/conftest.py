"""Platform test fixtures: a fresh PostgreSQL database per module, a dedicated Redis DB, and real
`ncp worker` / `ncp reconciler` processes.

Everything here is real: the registry is PostgreSQL (migrated with the project's Alembic
migrations), the broker is Redis, and workers are separate processes started with the `ncp` CLI,
so killing one with SIGKILL is a real worker crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from tests.servers import redis_url
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
# A Redis DB of its own: other areas' tests and developers use DB 0.
REDIS_DB = 13
REDIS_URL = redis_url(REDIS_DB)


@pytest.fixture(scope="module")
def pg_url():
    name = f"ncp_platform_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
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


class Procs:
    """`ncp` subprocesses of one test, each in its own process group, all killed at teardown."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def worker(self, name: str, queues: str) -> subprocess.Popen:
        return self.start(name, "worker", "--queues", queues)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


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


def tiny_spec(**overrides) -> dict:
    """A pretraining job small enough for 2 CPU cores: depth 2, head_dim 64, vocab 512, T 64."""
    spec = {
        "kind": "pretrain",
        "name": "tiny",
        "stages": ["data", "tokenizer", "pretrain"],
        "model": {
            "depth": 2,
            "aspect_ratio": 64,
            "head_dim": 64,
            "window_pattern": "L",
            "sequence_len": 64,
            "vocab_size": 512,
        },
        "data": {"source": "demo", "num_shards": 3},
        "tokenizer": {"vocab_size": 512, "max_chars": 300_000},
        "horizon": {"num_iterations": 12},
        "hardware": {"gpus": 0, "nodes": 1, "device": "cpu"},
        "batch": {"device_batch_size": 4, "total_batch_size": 256},
        "optim": {"warmup_steps": 2},
        "eval": {"every": 0, "tokens": 1024, "core_max_per_task": 4, "chat_max_per_task": 2},
        "checkpoint": {"every": 4, "keep_last": 10},
        "seed": 7,
    }
    for k, v in overrides.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec


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
