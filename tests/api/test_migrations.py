"""Alembic migrations create exactly the model's tables, on PostgreSQL and SQLite; `ncp db upgrade`."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from services.api.migrate import current_revision, downgrade, upgrade
from services.cli.main import main as ncp
from shared.db.models import Base
from shared.db.session import make_engine

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture(params=["postgres", "sqlite"])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"ncp_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_downgrades(empty_db):
    assert current_revision(empty_db) is None
    upgrade(empty_db)
    assert _tables(empty_db) == set(Base.metadata.tables) | {"alembic_version"}
    engine = make_engine(empty_db)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"
    upgrade(empty_db)  # idempotent
    downgrade(empty_db, "base")
    assert _tables(empty_db) == {"alembic_version"}


def test_ncp_db_upgrade_uses_settings(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("NCP_DATABASE_URL", url)
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert ncp(["db", "upgrade"]) == 0
    assert "revision 0002" in capsys.readouterr().out
    assert "jobs" in _tables(url)
    assert ncp(["db", "current"]) == 0
    assert "0002" in capsys.readouterr().out


def test_api_does_not_create_tables(tmp_path):
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from shared.settings import Settings

    url = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    app = create_app(
        Settings(home=tmp_path, database_url=url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    )
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "ncp db upgrade" in r.json()["error"]["message"]
    assert "jobs" not in _tables(url)
