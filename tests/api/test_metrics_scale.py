"""GET /jobs/{id}/metrics returns the whole run at the seed's scale: a 29,000-step pretraining
run with six series per step (174,000 rows) on PostgreSQL, paged with a cursor or downsampled on
the server, and a live SSE stream of what is recorded next."""

from __future__ import annotations

import datetime as dt
import json
import math

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from services.api.app import create_app
from services.api.metrics_series import minmax_indices
from shared.db import registry as r
from shared.db.models import Metric
from shared.jobs.spec import demo_spec

from .conftest import LiveServer

STEPS = 29_000
SERIES = ("loss", "raw_loss", "lr_mult", "tokens_per_sec", "mfu", "peak_memory_bytes")
SPIKE_STEP = 17_377  # one loss spike a chart must still show after downsampling


def curve(name: str, step: int) -> float:
    if name == "loss" and step == SPIKE_STEP:
        return 42.0
    return {
        "loss": 10 * math.exp(-step / 5000) + 2 + 0.01 * math.sin(step),
        "raw_loss": 10 * math.exp(-step / 5000) + 2 + 0.3 * math.sin(step * 7.1),
        "lr_mult": 1.0 if step < 10_000 else max(0.0, (STEPS - step) / (STEPS - 10_000)),
        "tokens_per_sec": 50_000 + 100 * math.sin(step / 3),
        "mfu": 0.4 + 0.01 * math.cos(step / 5),
        "peak_memory_bytes": 80e9,
    }[name]


@pytest.fixture(scope="module")
def big_run(postgres_db):
    """One job with 29,000 steps x 6 series of pretraining plus 300 SFT steps, bulk-inserted."""
    from shared.db.session import make_engine, make_session_factory

    engine = make_engine(postgres_db)
    sessions = make_session_factory(engine)
    with sessions() as s:
        job = r.create_job(s, demo_spec())
        jid = job.id
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {
            "job_id": jid,
            "stage": "pretrain",
            "step": step,
            "name": name,
            "value": curve(name, step),
            "ts": now,
        }
        for step in range(1, STEPS + 1)
        for name in SERIES
    ]
    rows += [
        {"job_id": jid, "stage": "sft", "step": step, "name": "loss", "value": 1.0 / step, "ts": now}
        for step in range(1, 301)
    ]
    with engine.begin() as conn:
        for i in range(0, len(rows), 20_000):
            conn.execute(insert(Metric), rows[i : i + 20_000])
    yield postgres_db, jid
    with engine.begin() as conn:
        conn.execute(Metric.__table__.delete().where(Metric.job_id == jid))
    engine.dispose()


@pytest.fixture
def big_client(big_run, tmp_path):
    from shared.settings import Settings

    url, jid = big_run
    settings = Settings(
        home=tmp_path / "home", database_url=url, broker_url=f"sqla+sqlite:///{tmp_path}/b.db"
    )
    with TestClient(create_app(settings)) as c:
        yield c, jid


def test_downsampled_whole_curve(big_client):
    client, jid = big_client
    body = client.get(f"/jobs/{jid}/metrics", params={"points": 1000}).json()
    assert body["mode"] == "downsampled" and body["points"] == 1000 and body["next_cursor"] is None
    assert body["rows"] == {**{n: STEPS for n in SERIES}, "loss": STEPS + 300}
    assert set(body["series"]) == set(SERIES)
    for name in SERIES:
        pre = [p for p in body["series"][name] if p["stage"] == "pretrain"]
        steps = [p["step"] for p in pre]
        # the whole run: first to last step, in order, within the budget
        assert steps[0] == 1 and steps[-1] == STEPS and steps == sorted(steps)
        assert len(pre) <= 1000
        values = [p["value"] for p in pre]
        truth = [curve(name, s) for s in range(1, STEPS + 1)]
        assert min(values) == min(truth) and max(values) == max(truth)
        # every point is a real row (step, value) of the series
        assert all(curve(name, p["step"]) == p["value"] for p in pre)
    pre_loss = [p for p in body["series"]["loss"] if p["stage"] == "pretrain"]
    assert {"step": SPIKE_STEP, "value": 42.0} in [{"step": p["step"], "value": p["value"]} for p in pre_loss]
    sft = [p for p in body["series"]["loss"] if p["stage"] == "sft"]
    assert len(sft) == 300  # short series come back whole
    assert body["last_id"] is not None


def test_paged_whole_run(big_client):
    client, jid = big_client
    seen: dict[str, list[int]] = {}
    cursor, pages = None, 0
    while True:
        params = {"name": ["loss", "mfu"], "stage": "pretrain", "limit": 10_000}
        if cursor:
            params["cursor"] = cursor
        body = client.get(f"/jobs/{jid}/metrics", params=params).json()
        assert body["mode"] == "paged"
        for name, pts in body["series"].items():
            seen.setdefault(name, []).extend(p["step"] for p in pts)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == math.ceil(2 * STEPS / 10_000)
    assert seen == {"loss": list(range(1, STEPS + 1)), "mfu": list(range(1, STEPS + 1))}


def test_bad_cursor_and_mixed_modes(big_client):
    client, jid = big_client
    resp = client.get(f"/jobs/{jid}/metrics", params={"cursor": "not-a-cursor"})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "cursor"
    resp = client.get(f"/jobs/{jid}/metrics", params={"cursor": "abc", "points": 100})
    assert resp.status_code == 422
    resp = client.get(f"/jobs/{jid}/metrics", params={"points": 3})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "points"


def test_minmax_indices_keep_envelope():
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_001)
    idx = minmax_indices(values, 101)
    assert len(idx) <= 101 and idx[0] == 0 and idx[-1] == 10_000 and list(idx) == sorted(set(idx))
    assert values[idx].min() == values.min() and values[idx].max() == values.max()
    assert list(minmax_indices(values[:50], 101)) == list(range(50))


def test_live_stream_appends_new_rows(settings, sessions):
    """The SSE mode sends rows recorded after ?after_id= and ends once the job has finished."""
    app = create_app(settings)
    app.state.sse_poll_seconds = 0.05
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        r.add_metrics(s, jid, "pretrain", 1, {"loss": 5.0})
    with TestClient(app) as c:
        last_id = c.get(f"/jobs/{jid}/metrics", params={"points": 100}).json()["last_id"]
    with sessions() as s:
        r.add_metrics(s, jid, "pretrain", 2, {"loss": 4.0, "mfu": 0.3})
        r.set_job_status(s, jid, "running")
        r.set_job_status(s, jid, "failed", error_code="x", error_message="y")
    with LiveServer(app) as srv:
        events = []
        with httpx.stream(
            "GET",
            f"{srv.url}/jobs/{jid}/metrics",
            params={"after_id": last_id},
            headers={"Accept": "text/event-stream"},
            timeout=30,
        ) as resp:
            event = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line.split(":", 1)[1])))
    assert events[-1][0] == "end"
    points = [p for ev, data in events if ev == "metrics" for p in data["points"]]
    assert sorted((p["name"], p["step"], p["value"]) for p in points) == [("loss", 2, 4.0), ("mfu", 2, 0.3)]
