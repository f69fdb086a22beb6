"""Registry fixtures: a fresh PostgreSQL database per test module (127.0.0.1:5432, user postgres)
and a fresh SQLite file, both migrated with Alembic exactly as `ncp db upgrade` does; tables are
emptied between tests. Also a real uvicorn server on a free port for SSE and CLI tests."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from services.api.migrate import upgrade
from shared.db.models import Base
from shared.db.session import make_engine, make_session_factory
from shared.settings import Settings
from tests.servers import PG_ADMIN, pg_url


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    name = f"ncp_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_url(name)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"
    upgrade(url)
    return url


def _empty_tables(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(text(f'DELETE FROM "{table.name}"'))
    finally:
        engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("postgres_db" if request.param == "postgres" else "sqlite_db")
    _empty_tables(url)
    return url


@pytest.fixture
def sessions(db_url: str):
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    home = tmp_path / "ncp_home"
    # Embedded broker in the test's own folder: enqueued messages land in a throwaway file.
    return Settings(
        home=home,
        database_url=db_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        inference_url=f"http://127.0.0.1:{free_port()}",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The real app under uvicorn in a background thread, on 127.0.0.1:<free port>."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    from services.api.app import create_app

    app = create_app(settings)
    app.state.sse_poll_seconds = 0.05
    with LiveServer(app) as srv:
        yield srv
