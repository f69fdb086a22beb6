"""A real uvicorn server: SSE details, the unreachable-API message and loopback-only access.

Jobs run for real (POST /jobs -> Redis -> `ncp worker`) in test_real_path.py.
"""

from __future__ import annotations

import httpx
import pytest

from services.api.client import ApiClientError, JobsClient, parse_sse, progress_line
from services.cli.main import main as ncp
from shared.jobs.spec import demo_spec


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_sse_unknown_job_is_404(live_server):
    with JobsClient(live_server.url) as client, pytest.raises(ApiClientError) as ei:
        list(client.stream_events("missing"))
    assert ei.value.status == 404


def test_parse_sse_handles_comments_and_multiline():
    lines = [": ping", "id: 3", "event: log", "data: a", "data: b", "", 'data: {"x": 1}', ""]
    evs = list(parse_sse(iter(lines)))
    assert [(e.id, e.event, e.data) for e in evs] == [("3", "log", "a\nb"), (None, "message", '{"x": 1}')]
    assert evs[1].json() == {"x": 1}


def test_progress_line():
    job = {
        "id": "12345678-abcd",
        "status": "running",
        "current_stage": "pretrain",
        "error": None,
        "progress": {
            "percent": 40.0,
            "stage_percent": 50.0,
            "step": 100,
            "total_steps": 200,
            "loss": 3.14159,
            "tokens_per_sec": 68000.0,
            "mfu": 0.275,
            "eta_seconds": 3725,
        },
    }
    line = progress_line(job)
    for part in (
        "stage pretrain",
        "step 100/200 (50%)",
        "loss 3.1416",
        "68.0k tok/s",
        "MFU 27.5%",
        "ETA 1h02m",
    ):
        assert part in line, part


def test_cli_unreachable_api(monkeypatch, capsys):
    from .conftest import free_port

    monkeypatch.setenv("NCP_API_URL", f"http://127.0.0.1:{free_port()}")
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert ncp(["jobs", "list"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the API" in err and "ncp up" in err and "NCP_API_URL" in err  # says how to fix it


def _non_loopback_ipv4() -> str | None:
    import socket

    for target in ("10.255.255.255", "192.0.2.255", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # UDP connect sends nothing; it only picks the outgoing interface
            except OSError:
                continue
            ip = s.getsockname()[0]
            if not ip.startswith("127."):
                return ip
    return None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_token_only_loopback_clients_are_served(settings):
    from services.api.app import create_app

    from .conftest import LiveServer

    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    # Bound to every interface (as with `uvicorn --host 0.0.0.0`) but configured without a token.
    with LiveServer(create_app(settings), host="0.0.0.0") as srv:
        remote = httpx.get(f"http://{ip}:{srv.port}/jobs")
        assert remote.status_code == 403 and remote.json()["error"]["code"] == "remote_access_disabled"
        assert httpx.get(f"http://{ip}:{srv.port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{srv.port}/jobs").status_code == 200
    secured = settings.model_copy(update={"api_token": "tok-123456"})
    with LiveServer(create_app(secured), host="0.0.0.0") as srv:
        resp = httpx.get(f"http://{ip}:{srv.port}/jobs", headers={"Authorization": "Bearer tok-123456"})
        assert resp.status_code == 200


def test_sse_reports_registry_loss_and_ends(tmp_path):
    """The registry disappears mid-stream: the client gets an `error` event, not a hung stream."""
    import secrets

    import psycopg

    from services.api.app import create_app
    from services.api.migrate import upgrade
    from shared.settings import Settings

    from .conftest import PG_ADMIN, LiveServer, pg_url

    name = f"ncp_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(pg_url(name))
        settings = Settings(
            home=tmp_path / "home",
            database_url=pg_url(name),
            broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        )
        app = create_app(settings)
        app.state.sse_poll_seconds = 0.05
        with LiveServer(app) as srv, JobsClient(srv.url) as client:
            job = client.submit(demo_spec().model_dump(mode="json"))
            stream = client.stream_events(job["id"])
            first = next(stream)
            assert first.event == "created"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            rest = list(stream)
            assert rest and rest[-1].event == "error"
            assert rest[-1].json()["code"] == "database_unavailable"
            assert client._http.get(f"/jobs/{job['id']}").status_code == 503
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
