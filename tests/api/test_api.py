"""The HTTP API over the real registry (PostgreSQL and SQLite), through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient

from services.api.app import InsecureBindError, create_app
from shared.db import registry as r
from shared.jobs.spec import demo_spec
from shared.paths import run_paths
from tests.servers import redis_url

from .conftest import free_port


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def demo():
    return demo_spec().model_dump(mode="json")


def submit(client, spec, key=None):
    headers = {"Idempotency-Key": key} if key else {}
    resp = client.post("/jobs", json=spec, headers=headers)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_submit_and_idempotency(client, demo):
    resp = client.post("/jobs", json=demo, headers={"Idempotency-Key": "abc"})
    assert resp.status_code == 202 and resp.headers["location"] == f"/jobs/{resp.json()['id']}"
    job = resp.json()
    assert job["status"] == "queued" and job["kind"] == "pipeline" and job["name"] == "demo"
    assert [s["name"] for s in job["stages"]] == demo["stages"]
    assert all(s["status"] == "pending" for s in job["stages"])
    assert job["progress"]["percent"] == 0 and job["spec"]["model"]["depth"] == demo["model"]["depth"]
    assert submit(client, demo, key="abc")["id"] == job["id"]
    other = dict(demo, seed=1)
    resp = client.post("/jobs", json=other, headers={"Idempotency-Key": "abc"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "idempotency_conflict"
    assert submit(client, demo)["id"] != job["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": {"depth": 0}}, "model.depth"),
        ({"model": {"depth": 2}, "colour": "red"}, "colour"),
        ({"horizon": {"num_iterations": -1}}, "horizon.num_iterations"),
        ({"data": {"source": "local", "path": "../../etc"}}, "data.path"),
        ({"data": {"source": "local", "path": "/etc"}}, "data.path"),
        ({"model": {"depth": 64}, "hardware": {"gpus": 1}}, "model.depth"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(client, body, field):
    resp = client.post("/jobs", json=body)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "validation_error" and err["field"] == field and field in err["message"]


def test_non_object_body_is_422(client):
    resp = client.post("/jobs", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


def test_list_pagination_and_filters(client, demo):
    ids = [submit(client, demo)["id"] for _ in range(5)]
    client.post(f"/jobs/{ids[1]}/cancel")
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params).json()
        assert page["count"] == len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    assert [j["id"] for j in client.get("/jobs", params={"status": "cancelled"}).json()["data"]] == [ids[1]]
    assert client.get("/jobs", params={"status": ["queued", "cancelled"]}).json()["count"] == 5
    bad = client.get("/jobs", params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
    bad = client.get("/jobs", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "limit"


@pytest.mark.parametrize("path", ["", "/events", "/metrics", "/checkpoints", "/logs", "/report", "/evals"])
def test_unknown_job_is_404(client, path):
    resp = client.get(f"/jobs/0000-missing{path}")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found"
    for action in ("cancel", "resume"):
        assert client.post(f"/jobs/0000-missing/{action}").status_code == 404


def test_cancel_and_resume_conflicts(client, demo, settings):
    jid = submit(client, demo)["id"]
    assert client.post(f"/jobs/{jid}/resume").status_code == 409  # queued: nothing to resume
    resp = client.post(f"/jobs/{jid}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    again = client.post(f"/jobs/{jid}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "illegal_transition"
    resumed = client.post(f"/jobs/{jid}/resume")
    assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
    # A finished job cannot be cancelled.
    with client.app.state.session_factory() as s:
        r.set_job_status(s, jid, "running")
        r.set_job_status(s, jid, "succeeded")
    assert client.post(f"/jobs/{jid}/cancel").status_code == 409
    assert client.post(f"/jobs/{jid}/resume").status_code == 409


def test_status_shows_progress_checkpoint_and_errors(client, demo):
    jid = submit(client, demo)["id"]
    with client.app.state.session_factory() as s:
        r.acquire_lease(s, jid, "w", 60)
        for name in ("data", "tokenizer"):
            r.start_stage(s, jid, name)
            r.finish_stage(s, jid, name, {"ok": True})
        r.start_stage(s, jid, "pretrain")
        r.update_progress(
            s,
            jid,
            step=20,
            total_steps=40,
            loss=3.25,
            tokens_per_sec=5000.0,
            mfu=0.3,
            eta_seconds=12.0,
            peak_memory=123,
        )
        r.record_checkpoint(s, jid, "pretrain", 20, "/ck/d2", "base", val_bpb=2.5)
        r.add_metrics(s, jid, "pretrain", 20, {"loss": 3.25, "val_bpb": 2.5})
        r.record_eval_results(s, jid, "base_eval", 20, {"core": {"centered": 0.01}})
    job = client.get(f"/jobs/{jid}").json()
    assert job["status"] == "running" and job["current_stage"] == "pretrain"
    assert {s["name"]: s["status"] for s in job["stages"]}["tokenizer"] == "succeeded"
    p = job["progress"]
    assert (p["step"], p["total_steps"], p["loss"], p["tokens_per_sec"], p["mfu"], p["eta_seconds"]) == (
        20,
        40,
        3.25,
        5000.0,
        0.3,
        12.0,
    )
    assert p["stage_percent"] == 50.0
    assert p["percent"] == pytest.approx(100 * 2.5 / len(demo["stages"]), abs=0.01)
    assert job["latest_checkpoint"]["step"] == 20 and job["latest_checkpoint"]["val_bpb"] == 2.5

    series = client.get(f"/jobs/{jid}/metrics").json()["series"]
    assert series["loss"][0]["step"] == 20 and series["val_bpb"][0]["value"] == 2.5
    assert list(client.get(f"/jobs/{jid}/metrics", params={"name": "loss"}).json()["series"]) == ["loss"]
    cks = client.get(f"/jobs/{jid}/checkpoints").json()
    assert cks["count"] == 1 and cks["data"][0]["path"] == "/ck/d2"
    assert client.get(f"/jobs/{jid}/evals").json()["data"][0]["value"] == 0.01
    with client.app.state.session_factory() as s:
        r.record_artifact(s, jid, "tokenizer", "/runs/x/tokenizer", "tokenizer")
    arts = client.get(f"/jobs/{jid}/artifacts").json()
    assert arts["count"] == 1 and arts["data"][0]["path"] == "/runs/x/tokenizer"

    with client.app.state.session_factory() as s:
        r.fail_stage(s, jid, "pretrain", "NaN loss", error_code="nan_loss")
    job = client.get(f"/jobs/{jid}").json()
    assert (
        job["status"] == "failed"
        and job["error"]["code"] == "nan_loss"
        and "NaN loss" in job["error"]["message"]
    )

    events = client.get(f"/jobs/{jid}/events").json()
    seqs = [e["seq"] for e in events["data"]]
    assert seqs == sorted(seqs) and events["next_after"] == seqs[-1]
    newer = client.get(f"/jobs/{jid}/events", params={"after": seqs[-3]}).json()
    assert [e["seq"] for e in newer["data"]] == seqs[-2:]


def test_logs_and_report(client, demo, settings):
    jid = submit(client, demo)["id"]
    assert client.get(f"/jobs/{jid}/logs").json()["logs"] == {}
    rp = run_paths(settings.runs_dir, jid)
    rp.logs.mkdir(parents=True)
    (rp.logs / "train.log").write_text("".join(f"line {i}\n" for i in range(5000)))
    (rp.logs / "data.log").write_text("shards ok\n")
    (rp.root / "secret.log").write_text("not yours")
    logs = client.get(f"/jobs/{jid}/logs", params={"lines": 3}).json()["logs"]
    assert logs["train.log"] == "line 4997\nline 4998\nline 4999" and logs["data.log"] == "shards ok"
    one = client.get(f"/jobs/{jid}/logs", params={"file": "train.log", "lines": 1}).json()["logs"]
    assert one == {"train.log": "line 4999"}
    for bad in ("../secret.log", "/etc/passwd", "train.txt"):
        resp = client.get(f"/jobs/{jid}/logs", params={"file": bad})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "file", bad
    assert client.get(f"/jobs/{jid}/logs", params={"file": "nope.log"}).status_code == 404

    assert client.get(f"/jobs/{jid}/report").json()["error"]["code"] == "report_not_ready"
    rp.report.mkdir(parents=True)
    (rp.report / "report.md").write_text("# Run report\n\nval bpb 2.5\n")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    (rp.report / "loss.png").write_bytes(png)
    resp = client.get(f"/jobs/{jid}/report")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/markdown")
    assert resp.text.startswith("# Run report")
    img = client.get(f"/jobs/{jid}/report/loss.png")
    assert img.status_code == 200 and img.content == png and img.headers["content-type"] == "image/png"
    assert client.get(f"/jobs/{jid}/report/..%2F..%2Fsecret.log").status_code in (404, 422)


def test_bearer_auth(settings, demo):
    secured = settings.model_copy(update={"api_token": "s3cret-token-value"})
    with TestClient(create_app(secured)) as c:
        assert c.get("/healthz").status_code == 200
        resp = c.get("/jobs")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert c.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert (
            c.post("/jobs", json=demo, headers={"Authorization": "Basic s3cret-token-value"}).status_code
            == 401
        )
        ok = {"Authorization": "Bearer s3cret-token-value"}
        assert c.post("/jobs", json=demo, headers=ok).status_code == 202
        assert c.get("/jobs", headers=ok).json()["count"] == 1


def test_refuses_insecure_bind(settings):
    with pytest.raises(InsecureBindError, match="NCP_API_TOKEN"):
        create_app(settings.model_copy(update={"api_host": "0.0.0.0"}))
    create_app(settings.model_copy(update={"api_host": "0.0.0.0", "api_allow_remote_without_token": True}))
    create_app(settings.model_copy(update={"api_host": "0.0.0.0", "api_token": "a-real-token"}))


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_database_down_is_503_not_a_crash(settings):
    down = settings.model_copy(
        update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"}
    )
    with TestClient(create_app(down)) as c:
        resp = c.get("/jobs")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "database_unavailable"
        assert c.post("/jobs", json=demo_spec().model_dump(mode="json")).status_code == 503
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        assert c.get("/healthz").status_code == 200  # the process itself is alive
        assert "ncp_registry_up 0.0" in c.get("/metrics").text


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_readiness(settings):
    with TestClient(create_app(settings.model_copy(update={"broker_url": redis_url(15)}))) as c:
        resp = c.get("/readyz")
        assert resp.status_code == 200 and resp.json()["checks"] == {"database": "ok", "broker": "ok"}
    dead_broker = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(dead_broker)) as c:
        resp = c.get("/readyz")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "broker_unavailable"


def test_prometheus_metrics(client, demo):
    submit(client, demo)
    client.get("/jobs/missing")
    text = client.get("/metrics").text
    assert 'ncp_api_requests_total{method="POST",route="/jobs",status="202"} 1.0' in text
    assert 'ncp_api_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0' in text
    assert 'ncp_jobs{status="queued"} 1.0' in text and "ncp_api_request_seconds_bucket" in text


def test_served_models(client, settings):
    body = client.get("/models/served").json()
    assert body["current"] is None and body["live"]["reachable"] is False

    seen_auth: list[str | None] = []

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen_auth.append(self.headers.get("Authorization"))
            payload = json.dumps({"object": "list", "data": [{"id": "demo-d2", "object": "model"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    port = int(settings.inference_url.rsplit(":", 1)[1])
    server = HTTPServer(("127.0.0.1", port), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings.serving_dir.mkdir(parents=True, exist_ok=True)
        (settings.serving_dir / "current.json").write_text(
            json.dumps({"model": "demo-d2", "path": "/x/export"})
        )
        body = client.get("/models/served").json()
        assert body["current"] == {"model": "demo-d2", "path": "/x/export"}
        assert body["live"]["reachable"] and body["live"]["models"][0]["id"] == "demo-d2"
        assert seen_auth[-1] is None
        # With a chat key configured, the API asks the model server with it.
        keyed = settings.model_copy(update={"inference_api_key": "chat-key-123456"})
        with TestClient(create_app(keyed)) as c:
            assert c.get("/models/served").json()["live"]["reachable"]
        assert seen_auth[-1] == "Bearer chat-key-123456"
    finally:
        server.shutdown()
        server.server_close()


def test_openapi_documents_jobspec(client):
    doc = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/cancel", "/readyz"} <= set(
        doc["paths"]
    )
    body = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    schemas = doc["components"]["schemas"]
    assert "model" in schemas["JobSpec"]["properties"] and "ModelSpec" in schemas
    assert "JobPublic" in schemas and "JobsPublic" in schemas


def test_openapi_lists_real_statuses_and_media_types(client):
    paths = client.get("/openapi.json").json()["paths"]
    post = paths["/jobs"]["post"]["responses"]
    assert {"202", "400", "401", "403", "409", "413", "422", "503"} <= set(post)
    report = paths["/jobs/{job_id}/report"]["get"]["responses"]
    assert set(report["200"]["content"]) == {"text/markdown"}
    # Errors are JSON on every route, including those whose success is Markdown, PNG or text.
    for route in ("/jobs/{job_id}/report", "/jobs/{job_id}/report/{name}", "/jobs/{job_id}"):
        for status, response in paths[route]["get"]["responses"].items():
            if int(status) >= 400:
                assert set(response["content"]) == {"application/json"}, (route, status)
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert {"200", "503"} <= set(paths["/readyz"]["get"]["responses"])


def _error(resp, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if field is not None:
        assert err["field"] == field and field in err["message"], err
    return err


def test_hostile_input_is_refused_not_a_500(client, demo):
    jid = submit(client, demo)["id"]
    # Integers the registry's 32-bit columns cannot hold.
    _error(client.get(f"/jobs/{jid}/events", params={"after": 2**31}), 422, "after")
    _error(client.get(f"/jobs/{jid}/metrics", params={"after_step": 2**31}), 422, "after_step")
    # A NUL byte anywhere in the URL.
    for url in (
        f"/jobs/{jid}/metrics?stage=pre%00train",
        "/jobs?cursor=%00",
        f"/jobs/{jid}/logs?file=a%00.log",
    ):
        assert _error(client.get(url), 422)["code"] == "validation_error", url
    _error(client.get("/jobs/abc%00def"), 422)
    # Unknown enum values in filters.
    _error(client.get("/jobs", params={"kind": "bogus"}), 422, "kind")
    _error(client.get(f"/jobs/{jid}/metrics", params={"stage": "bogus"}), 422, "stage")
    _error(client.get(f"/jobs/{jid}/checkpoints", params={"kind": "huge"}), 422, "kind")
    # Bodies: Infinity and NaN, floats for counts, booleans for numbers, NUL in strings.
    raw = [
        ('{"horizon": {"target_flops": 1e400}}', "horizon.target_flops"),
        ('{"optim": {"matrix_lr": NaN}}', "optim.matrix_lr"),
        ('{"horizon": {"num_iterations": 3e9}}', "horizon.num_iterations"),
        ('{"horizon": {"num_iterations": 3000000000}}', "horizon.num_iterations"),
        ('{"model": {"depth": true}}', "model.depth"),
        ('{"model": {"depth": "4"}}', "model.depth"),
        ('{"name": "a\\u0000b"}', "name"),
        ('{"kind": "pretrain", "eval": {"every": 1e3}}', "eval.every"),
    ]
    for body, field in raw:
        resp = client.post("/jobs", content=body.encode(), headers={"content-type": "application/json"})
        _error(resp, 422, field)
    # References checked at submit: an unknown parent job, a local corpus that is not there.
    resp = client.post("/jobs", json={"kind": "eval", "parent_job_id": "0000-no-such-job"})
    _error(resp, 422, "parent_job_id")
    _error(client.post("/jobs", json={"data": {"source": "local", "path": "nowhere"}}), 422, "data.path")
    child = client.post("/jobs", json={"kind": "eval", "parent_job_id": jid})
    assert child.status_code == 202 and child.json()["spec"]["parent_job_id"] == jid
    # Malformed JSON is a documented 400, not a crash.
    resp = client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code in (400, 422) and "error" in resp.json()
    bad_key = client.post("/jobs", json=demo, headers={"Idempotency-Key": "a b"})
    _error(bad_key, 422, "Idempotency-Key")


def test_request_size_is_limited(client):
    from services.api.limits import MAX_BODY_BYTES

    big = b'{"name": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    resp = client.post("/jobs", content=big, headers={"content-type": "application/json"})
    assert _error(resp, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the body streams in and is counted as it arrives
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * (64 * 1024)
        yield b'"}'

    resp = client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert _error(resp, 413)["code"] == "request_too_large"
