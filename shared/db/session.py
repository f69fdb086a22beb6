"""Engine and session factories for the run registry (PostgreSQL in deployments, SQLite embedded).

SQLite needs care to be shared by several processes (API, workers, reconciler): WAL so readers
never block the writer, a busy timeout so a writer waits instead of failing, and registry
functions that write open their transaction with `BEGIN IMMEDIATE` (see `begin_write`), because
a deferred transaction that reads first and writes later fails at once with "database is locked"
when another process committed in between, and no busy timeout helps with that.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings, get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option that makes the next transaction on a SQLite connection take the write lock.
_WRITE_OPTION = "ncp_sqlite_immediate"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys and explicit BEGINs."""
    if not is_sqlite(url):
        # pre_ping: a Postgres restart must not turn into errors on the first request after it.
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
        return create_engine(url, **kwargs)

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        # Create the folder of the database file; a fresh NCP_HOME has none yet.
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so we can choose the BEGIN kind.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: registry functions return rows that callers read after the commit.
    return sessionmaker(bind=engine, expire_on_commit=False)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """Engine + session factory for `Settings.database_url` (the usual entry point for workers)."""
    settings = settings or get_settings()
    assert settings.database_url is not None  # filled in by Settings
    return make_session_factory(make_engine(settings.database_url))


@functools.lru_cache(maxsize=4)
def _factory_for(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


def cached_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """One engine per registry URL per process (engines pool connections; build them once)."""
    settings = settings or get_settings()
    assert settings.database_url is not None
    return _factory_for(settings.database_url)


def begin_write(session: Session) -> None:
    """Start the session's transaction as a write transaction (SQLite: BEGIN IMMEDIATE).

    Called at the top of every registry function that writes; a no-op on PostgreSQL, whose row
    locks do the job. On SQLite a transaction the session already has open (typically a read)
    is committed first, because it cannot be upgraded to a write lock safely; the registry
    function commits right after anyway, so the caller's pending changes land either way.
    """
    if session.get_bind().dialect.name != "sqlite":
        return
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={_WRITE_OPTION: True})


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that is rolled back on error and always closed."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
