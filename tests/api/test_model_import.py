"""POST /models/import over the real registry (PostgreSQL and SQLite): the body is an import job's
spec section, submitted as POST /jobs submits a job; refusals are 422s naming the body's field.
(tests/api/test_real_path.py runs such a job through a worker; tests/platform/test_import_job.py
covers the stage.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.db import model_registry


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def source(settings) -> Path:
    d = settings.home / "datasets" / "nanochat"
    d.mkdir(parents=True)  # the submit checks the folder exists; the stage checks what is in it
    return d


def test_import_is_a_job(client, source):
    body = {"source": "nanochat", "path": str(source), "name": "upstream"}
    resp = client.post("/models/import", json=body, headers={"Idempotency-Key": "imp-1"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/jobs/{job['id']}"
    assert job["kind"] == "import" and job["status"] == "queued"
    assert [s["name"] for s in job["stages"]] == ["import"] and job["spec"]["import"] == body
    # The same shape as POST /jobs, and the same job for a repeated key...
    assert client.get(f"/jobs/{job['id']}").json()["spec"] == job["spec"]
    again = client.post("/models/import", json=body, headers={"Idempotency-Key": "imp-1"})
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    # ...but not for another body.
    other = client.post(
        "/models/import", json={**body, "name": "other"}, headers={"Idempotency-Key": "imp-1"}
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # POST /jobs takes the same job as a spec; `source` defaults to nanochat.
    spec = {"kind": "import", "import": {"path": "datasets/nanochat", "name": "via-jobs"}}
    resp = client.post("/jobs", json=spec)
    assert resp.status_code == 202 and resp.json()["kind"] == "import", resp.text


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"path": "/etc"}, "path", "outside the allowed data roots"),
        ({"path": "../../elsewhere"}, "path", "outside the allowed data roots"),
        ({"path": "datasets/missing"}, "path", "does not exist"),
        ({"path": "0" * 4000}, "path", "File name too long"),
        ({"name": "../up"}, "name", "must be 1-64 characters"),
        ({"name": ""}, "name", ""),
        ({"source": "huggingface"}, "source", ""),
        ({"stages": ["import"]}, "stages", "Extra inputs"),
    ],
)
def test_refusals_name_the_body_field(client, source, change, field, words):
    body = {"source": "nanochat", "path": str(source), "name": "m", **change}
    resp = client.post("/models/import", json=body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == field and words in err["message"], err


def test_symlinked_source_pointing_outside_is_refused(client, settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = settings.home / "datasets" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    resp = client.post("/models/import", json={"path": str(link), "name": "m"})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "path"
    assert "outside the allowed data roots" in resp.json()["error"]["message"]


def test_taken_name_is_refused_at_submit(client, settings, sessions, source):
    folder = settings.models_dir / "taken"
    manifest = {
        "name": "taken",
        "path": str(folder),
        "source": {"path": "/x"},
        "tokenizer": None,
        "checkpoints": [],
    }
    with sessions() as s:
        model_registry.register_import(s, manifest)
    resp = client.post("/models/import", json={"path": str(source), "name": "taken"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == "name" and "model 'taken' already exists (import model" in err["message"]
    resp = client.post("/jobs", json={"kind": "import", "import": {"path": str(source), "name": "taken"}})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "import.name"
    # A folder in the way (an import outside the registry) is refused too.
    (settings.models_dir / "in-the-way").mkdir(parents=True)
    resp = client.post("/models/import", json={"path": str(source), "name": "in-the-way"})
    assert resp.status_code == 422 and "is in the way" in resp.json()["error"]["message"]


def test_needs_the_token_like_every_route(settings, source):
    secured = settings.model_copy(update={"api_token": "s3cret-token-value"})
    with TestClient(create_app(secured)) as c:
        body = {"path": str(source), "name": "m"}
        assert c.post("/models/import", json=body).status_code == 401
        ok = c.post("/models/import", json=body, headers={"Authorization": "Bearer s3cret-token-value"})
        assert ok.status_code == 202, ok.text


def test_openapi_documents_the_route(client):
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/models/import"]["post"]
    assert {"202", "401", "409", "422"} <= set(op["responses"])
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImportSpec"
    }
    assert set(doc["components"]["schemas"]["ImportSpec"]["properties"]) == {"source", "path", "name"}
    assert "import" in doc["components"]["schemas"]["JobSpec"]["properties"]
