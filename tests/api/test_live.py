"""A real uvicorn server: the SSE event stream and the `ncp jobs` CLI end to end."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from services.api.client import ApiClientError, JobsClient, parse_sse, progress_line
from services.cli.main import main as ncp
from shared.db import registry as r
from shared.db.session import make_engine, make_session_factory
from shared.jobs.spec import demo_spec


def drive(db_url: str, job_id: str, *, fail: bool = False, delay: float = 0.05) -> threading.Thread:
    """What a worker does to the registry, from another thread with its own connections."""

    def run() -> None:
        engine = make_engine(db_url)
        try:
            with make_session_factory(engine)() as s:
                time.sleep(delay * 4)
                assert r.acquire_lease(s, job_id, "test-worker", 60)
                for stage in ("data", "tokenizer", "pretrain"):
                    r.start_stage(s, job_id, stage)
                    for step in range(0, 3):
                        r.update_progress(
                            s, job_id, step=step, total_steps=3, loss=4.0 - step, eta_seconds=3 - step
                        )
                        r.add_event(s, job_id, "progress", f"{stage} step {step}", stage=stage)
                        time.sleep(delay)
                    if fail and stage == "pretrain":
                        r.fail_stage(s, job_id, stage, "loss diverged", error_code="nan_loss")
                        return
                    r.finish_stage(s, job_id, stage)
                r.set_job_status(s, job_id, "succeeded")
                r.release_lease(s, job_id, "test-worker")
        finally:
            engine.dispose()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sse_follows_job_until_it_ends(live_server, db_url):
    client = JobsClient(live_server.url)
    job = client.submit(demo_spec(stages=["data", "tokenizer", "pretrain"]).model_dump(mode="json"))
    worker = drive(db_url, job["id"])
    events = list(client.stream_events(job["id"]))
    worker.join(30)
    assert events[-1].event == "end"
    body = [e for e in events if e.event != "end"]
    seqs = [int(e.id) for e in body]
    assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, none twice
    assert [e.json()["seq"] for e in body] == seqs
    assert body[-1].event == "status" and body[-1].json()["data"]["to"] == "succeeded"
    assert sum(e.event == "progress" for e in body) == 9

    # A reconnecting client sends Last-Event-ID and gets only what came after it.
    with httpx.stream(
        "GET",
        f"{live_server.url}/jobs/{job['id']}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(seqs[-3])},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        again = list(parse_sse(resp.iter_lines()))
    assert [int(e.id) for e in again if e.event != "end"] == seqs[-2:]
    client.close()


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


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_cli_jobs_commands(live_server, db_url, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NCP_API_URL", live_server.url)
    from shared.settings import get_settings

    get_settings.cache_clear()

    assert (
        ncp(["jobs", "submit", "--preset", "demo", "--set", "seed=7", "--set", "name=cli-test", "--json"])
        == 0
    )
    job = json.loads(capsys.readouterr().out)
    assert job["spec"]["seed"] == 7 and job["name"] == "cli-test" and job["status"] == "queued"

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        json.dumps(demo_spec(stages=["data", "tokenizer", "pretrain"]).model_dump(mode="json"))
    )
    assert ncp(["jobs", "submit", "--spec", str(spec_file), "--depth", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job ") and "stages: data, tokenizer, pretrain" in out
    second = out.split()[2]

    assert ncp(["jobs", "submit", "--preset", "demo", "--depth", "0"]) == 1
    assert "model.depth" in capsys.readouterr().err

    assert ncp(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert job["id"] in listing and second in listing

    assert ncp(["jobs", "cancel", job["id"]]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert ncp(["jobs", "cancel", job["id"]]) == 1
    assert "409" in capsys.readouterr().err
    assert ncp(["jobs", "resume", job["id"]]) == 0
    assert "queued" in capsys.readouterr().out

    assert ncp(["jobs", "status", "no-such-job"]) == 1
    assert "404" in capsys.readouterr().err

    # watch follows the job to the end; the exit code says how it ended.
    worker = drive(db_url, second)
    assert ncp(["jobs", "watch", second]) == 0
    worker.join(30)
    out = capsys.readouterr().out
    assert "[pretrain] pretrain step 2" in out and "succeeded" in out and "loss" in out

    assert ncp(["jobs", "status", second]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "3. pretrain" in out

    from shared.paths import run_paths

    logs = run_paths(get_settings().runs_dir, second).logs
    logs.mkdir(parents=True)
    (logs / "train.log").write_text("step 1\nstep 2\n")
    assert ncp(["jobs", "logs", second, "--lines", "1"]) == 0
    assert capsys.readouterr().out.strip() == "step 2"

    third = demo_spec(stages=["data", "tokenizer", "pretrain"]).model_dump(mode="json")
    with JobsClient(live_server.url) as client:
        failing = client.submit(third)["id"]
    worker = drive(db_url, failing, fail=True)
    assert ncp(["jobs", "watch", failing]) == 1
    worker.join(30)
    assert "nan_loss" in capsys.readouterr().out


def test_cli_unreachable_api(monkeypatch, capsys):
    from .conftest import free_port

    monkeypatch.setenv("NCP_API_URL", f"http://127.0.0.1:{free_port()}")
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert ncp(["jobs", "list"]) == 1
    assert "cannot reach the API" in capsys.readouterr().err


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
