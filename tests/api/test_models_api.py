"""GET /models, GET /models/{name}, POST /models/{name}/serve over the real registry (PostgreSQL and
SQLite) with real files: a tiny model checkpointed, exported and published the way the serve stage
publishes; the refusals (no checkpoint, no tokenizer, vocab mismatch); and, without an export,
the export-and-serve job it submits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.db import model_registry as mr
from shared.db import registry
from shared.nanochat.checkpoint import save_checkpoint
from shared.nanochat.corpus import iter_shard_texts, split_shards
from shared.nanochat.demo_corpus import write_demo_corpus
from shared.nanochat.export import export_model
from shared.nanochat.tokenizer import train_tokenizer
from tests.upstream import TINY, tiny_state


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder: tokenizer (vocab 300), sft checkpoint step 5 of the TINY model, its export."""
    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus"
    write_demo_corpus(corpus, num_shards=2, max_bytes=100_000)
    train_tokenizer(
        iter_shard_texts(split_shards(corpus)[0]), vocab_size=TINY.vocab_size, out_dir=root / "tokenizer"
    )
    ckpt = root / "chatsft_checkpoints" / "d2"
    save_checkpoint(ckpt, 5, tiny_state(), {"m": torch.zeros(1)}, {"model_config": TINY.to_dict()})
    export_model(ckpt, None, root / "tokenizer", root / "export", dtype="float32")
    return root


def _manifest(name: str, root: Path, *, tokenizer: bool = True, sft_steps=(5,), vocab: int = 300) -> dict:
    return {
        "name": name,
        "path": str(root),
        "source": {"kind": "nanochat", "path": f"/upstream/{name}"},
        "tokenizer": {"path": "tokenizer", "vocab_size": 300} if tokenizer else None,
        "checkpoints": [
            {
                "phase": "sft",
                "tag": "d2",
                "path": "chatsft_checkpoints/d2",
                "steps": list(sft_steps),
                "vocab_size": vocab,
                "optimizer_ranks": {str(s): 1 for s in sft_steps},
            }
        ]
        if sft_steps
        else [],  # fmt: skip
    }


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def test_list_show_and_served_route(client, sessions, tiny_run):
    assert client.get("/models").json() == {"data": [], "count": 0}
    with sessions() as s:
        mr.register_import(s, _manifest("tiny", tiny_run))
        mr.register_import(s, _manifest("tiny-ft", tiny_run), parent_model="tiny")
        mr.record_export(s, "tiny", tiny_run / "export", phase="sft", step=5)
    r = client.get("/models")
    assert r.status_code == 200 and r.json()["count"] == 2
    rows = {m["name"]: m for m in r.json()["data"]}
    assert rows["tiny"]["latest_steps"] == {"sft": 5} and rows["tiny"]["export_count"] == 1
    assert rows["tiny"]["vocab_size"] == 300 and rows["tiny"]["has_tokenizer"] is True
    assert rows["tiny-ft"]["lineage"] == {
        "source": "import", "source_job_id": None, "source_path": "/upstream/tiny-ft", "parent_model": "tiny",
    }  # fmt: skip
    one = client.get("/models/tiny").json()
    assert one["path"] == str(tiny_run) and one["tokenizer_path"] == str(tiny_run / "tokenizer")
    assert one["checkpoints"] == [
        {"phase": "sft", "step": 5, "path": str(tiny_run / "chatsft_checkpoints" / "d2"),
         "has_optimizer": True, "optimizer_world_size": 1}
    ]  # fmt: skip
    assert [(e["phase"], e["step"], e["format"]) for e in one["exports"]] == [("sft", 5, "hf")]
    r = client.get("/models/nope")
    assert r.status_code == 404 and r.json()["error"] == {
        "code": "model_not_found",
        "message": "model 'nope' not found",
    }
    # /models/served is still the served-models route, not a model called "served"
    served = client.get("/models/served")
    assert served.status_code == 200 and set(served.json()) == {"current", "live"}
    with sessions() as s, pytest.raises(ValueError, match="'served' is reserved"):
        mr.register_import(s, _manifest("served", tiny_run))


def test_serve_publishes_the_recorded_export(client, sessions, settings, tiny_run):
    with sessions() as s:
        mr.register_import(s, _manifest("tiny", tiny_run))
        mr.record_export(s, "tiny", tiny_run / "export", phase="sft", step=5)
    r = client.post("/models/tiny/serve", json={})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["phase"], body["step"], body["export_dir"]) == (
        "tiny", "sft", 5, str(tiny_run / "export"),
    )  # fmt: skip
    current = json.loads((settings.serving_dir / "current.json").read_text())
    assert current["model"] == "tiny" and current["path"] == str((tiny_run / "export").resolve())
    assert client.get("/models/served").json()["current"]["model"] == "tiny"
    # a step that does not exist names the steps that do
    r = client.post("/models/tiny/serve", json={"step": 9})
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_checkpoint"
    assert "no sft checkpoint at step 9; sft steps: [5]" in r.json()["error"]["message"]
    r = client.post("/models/tiny/serve", json={"phase": "base"})
    assert r.status_code == 409 and "'tiny' has no base checkpoint (it has: sft up to step 5)" in r.text
    r = client.post("/models/tiny/serve", json={"phase": "chat"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "phase"


def test_serve_refusals(client, sessions, settings, tiny_run, tmp_path):
    with sessions() as s:
        mr.register_import(s, _manifest("empty", tiny_run, sft_steps=()))
        mr.register_import(s, _manifest("no-tok", tmp_path / "no-tok", tokenizer=False))
        mr.register_import(s, _manifest("no-export", tiny_run))
    # a checkpoint whose meta says vocab 512 next to the 300-token tokenizer
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "tokenizer").symlink_to(tiny_run / "tokenizer")
    save_checkpoint(wrong / "chatsft_checkpoints" / "d2", 5, {"w": torch.zeros(1)}, None,
                    {"model_config": {**TINY.to_dict(), "vocab_size": 512}})  # fmt: skip
    with sessions() as s:
        mr.register_import(s, _manifest("wrong", wrong, vocab=512))
    expect = {
        "empty": ("no_checkpoint", "model 'empty' has no base checkpoint"),
        "no-tok": ("no_tokenizer", "model 'no-tok' has no tokenizer"),
        "wrong": ("vocab_mismatch", "has 300 tokens but model 'wrong' (sft step 5) was trained with vocab_size 512"),
        "ghost": ("model_not_found", "model 'ghost' not found"),
    }  # fmt: skip
    for name, (code, message) in expect.items():
        r = client.post(f"/models/{name}/serve")
        assert r.status_code == (404 if code == "model_not_found" else 409), (name, r.text)
        assert r.json()["error"]["code"] == code and message in r.json()["error"]["message"], r.text
    with sessions() as s:  # refused before anything was submitted
        assert registry.list_jobs(s)[0] == []
    assert not (settings.serving_dir / "current.json").exists()  # nothing was published


def test_serve_without_an_export_submits_an_export_and_serve_job(client, sessions, settings, tiny_run):
    """No recorded export of the chosen checkpoint: a 202 with the job that exports and serves it,
    submitted as POST /jobs submits (the registry row is the job's; the workers run it,
    tests/platform/test_serve_imported.py follows one to the served model)."""
    rl = _manifest("with-rl", tiny_run)
    rl["checkpoints"].append({**rl["checkpoints"][0], "phase": "rl"})
    with sessions() as s:
        mr.register_import(s, _manifest("no-export", tiny_run))
        mr.register_import(s, rl)
    r = client.post("/models/no-export/serve", json={"step": 5}, headers={"Idempotency-Key": "serve-1"})
    assert r.status_code == 202, r.text
    body = r.json()
    job = body["job"]
    assert (body["model"], body["phase"], body["step"]) == ("no-export", "sft", 5)
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert [st["name"] for st in job["stages"]] == ["export", "serve"]
    assert job["kind"] == "pipeline" and job["status"] == "queued"
    assert job["spec"]["init"] == {"model": "no-export", "phase": "sft", "step": 5}
    assert (
        job["spec"]["model"]["vocab_size"] == 300 and job["spec"]["model"]["depth"] == 2
    )  # the checkpoint's
    assert client.get(f"/jobs/{job['id']}").json()["spec"] == job["spec"]  # a job like any other
    # the same key is the same job; the export does not exist yet, so nothing is published
    again = client.post("/models/no-export/serve", json={"step": 5}, headers={"Idempotency-Key": "serve-1"})
    assert again.status_code == 202 and again.json()["job"]["id"] == job["id"]
    assert not (settings.serving_dir / "current.json").exists()
    # a phase no job exports: still a 409, naming the phase, and no job
    r = client.post("/models/with-rl/serve", json={"phase": "rl"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_export", r.text
    assert (
        r.json()["error"]["field"] == "phase" and "exports only base or sft" in r.json()["error"]["message"]
    )
    with sessions() as s:
        assert [j.id for j in registry.list_jobs(s)[0]] == [job["id"]]
    # the OpenAPI document gives both answers their schemas
    doc = client.get("/openapi.json").json()["paths"]["/models/{name}/serve"]["post"]["responses"]
    assert doc["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ServeModelResult")
    assert doc["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/ServeModelQueued")


def test_models_routes_need_the_token(settings):
    secured = settings.model_copy(update={"api_token": "s3cret-token-value"})
    with TestClient(create_app(secured)) as c:
        for method, path in (("GET", "/models"), ("GET", "/models/x"), ("POST", "/models/x/serve")):
            r = c.request(method, path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        ok = c.get("/models", headers={"Authorization": "Bearer s3cret-token-value"})
        assert ok.status_code == 200


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_ncp_models_cli(live_server, db_url, sessions, tiny_run, monkeypatch, capsys):
    from services.cli.main import main as ncp
    from shared.settings import get_settings

    monkeypatch.setenv("NCP_API_URL", live_server.url)
    get_settings.cache_clear()
    try:
        assert ncp(["models", "list"]) == 0
        assert "no models yet" in capsys.readouterr().out
        with sessions() as s:
            mr.register_import(s, _manifest("tiny", tiny_run), parent_model="up-d20")
            mr.record_export(s, "tiny", tiny_run / "export", phase="sft", step=5)
        assert ncp(["models", "list"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:6] == ["NAME", "SOURCE", "VOCAB", "BASE", "SFT", "EXPORTS"]
        assert out[1].split()[:6] == ["tiny", "import", "300", "-", "5", "1"]
        assert out[1].endswith("/upstream/tiny <- up-d20")
        assert ncp(["models", "show", "tiny"]) == 0
        shown = capsys.readouterr().out
        assert "imported:   from /upstream/tiny" in shown and "parent:     up-d20" in shown
        assert "sft  step       5  optimizer state of 1 rank(s)" in shown
        assert f"export (hf, sft step 5): {tiny_run / 'export'}" in shown
        assert ncp(["models", "show", "tiny", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["checkpoints"][0]["step"] == 5
        assert ncp(["models", "show", "ghost"]) == 1
        assert "model 'ghost' not found" in capsys.readouterr().err
        assert ncp(["models", "serve", "tiny"]) == 0
        assert f"serving tiny (sft step 5) from {tiny_run / 'export'}" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()


def test_plan_of_a_job_on_a_model_sizes_the_checkpoint(client, sessions, tiny_run):
    """POST /plan takes the init checkpoint's shape, as POST /jobs stores it: not the spec defaults."""
    from shared.nanochat.sizing import param_breakdown

    with sessions() as s:
        mr.register_import(s, _manifest("tiny-plan", tiny_run))
    spec = {
        "kind": "pretrain",
        "init": {"model": "tiny-plan", "phase": "sft"},
        "horizon": {"num_iterations": 10},
        "hardware": {"gpus": 0, "device": "cpu"},
        "batch": {"device_batch_size": 1, "total_batch_size": None},
    }
    r = client.post("/plan", json=spec)
    assert r.status_code == 200, r.text
    assert r.json()["params"] == param_breakdown(TINY)["total"]
    assert r.json()["num_iterations"] == 10
    unknown = client.post("/plan", json={**spec, "init": {"model": "no-such-model"}})
    assert unknown.status_code == 422 and "init.model" in unknown.text
