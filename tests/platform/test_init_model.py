"""Bring your own nanochat run (issue #13), the whole way: an upstream-format nanochat dir
(tiktoken tokenizer.pkl, a base checkpoint whose optimizer state 2 real gloo ranks wrote) is
imported with `ncp import nanochat`, then jobs start from it through POST /jobs (the API on
PostgreSQL) -> Redis -> real `ncp worker` processes: continued pretraining with the saved
optimizer state resharded 2 -> 1 and with a fresh optimizer, an eval job, an SFT job, and a
tokenizer that does not fit the model refused before any work, naming both sizes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.cli.main import main as ncp
from services.worker.pipeline import run_stage
from shared.db import model_registry as mr
from shared.db import registry
from shared.db.session import session_scope
from shared.settings import get_settings
from tests.tiny import TINY_VOCAB, tiny_corpus
from tests.upstream import (
    TINY,
    run_optimizer,
    tiny_state,
    upstream_encoding,
    write_upstream_checkpoint,
    write_upstream_tokenizer,
)

pytestmark = pytest.mark.slow

# The upstream model: TINY (depth 2, width 64, 2 heads, vocab 300) at the platform tests' T=64.
UPSTREAM = dataclasses.replace(TINY, sequence_len=64)
JOB = {
    "data": {"source": "demo", "num_shards": 3},
    "hardware": {"gpus": 0, "nodes": 1, "device": "cpu"},
    "batch": {"device_batch_size": 4, "total_batch_size": 256},
    "optim": {"warmup_steps": 1},
    "eval": {"every": 0, "tokens": 1024, "core_max_per_task": 2, "chat_max_per_task": 2},
    "checkpoint": {"every": 0, "keep_last": 2},
    "sft": {"num_iterations": 2, "device_batch_size": 2},
    "seed": 7,
}


@pytest.fixture(scope="module")
def upstream_dir(tmp_path_factory):
    """~/.cache/nanochat as upstream writes it: tokenizer.pkl + token_bytes.pt, base_checkpoints/d2
    step 3 with 2 ranks' MuonAdamW shards."""
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("nanochat_base")
    corpus = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(corpus, num_shards=3, max_bytes=200_000)
    enc = upstream_encoding(list(iter_shard_texts(split_shards(corpus)[0])), vocab_size=UPSTREAM.vocab_size)
    write_upstream_tokenizer(root / "tokenizer", enc)
    state = tiny_state(UPSTREAM)
    model3, shards = run_optimizer(
        2, state, [(0, True), (1, True), (2, True)], tmp_path_factory.mktemp("opt") / "o", config=UPSTREAM
    )
    write_upstream_checkpoint(root / "base_checkpoints" / "d2", 3, model3, UPSTREAM, shards)
    return root


@pytest.fixture
def api(platform_env):
    from services.api.app import create_app

    with TestClient(create_app(get_settings())) as client:
        yield client


def _events(sessions, job_id, type_):
    with session_scope(sessions) as s:
        return [e for e in registry.list_events(s, job_id, limit=1000) if e.type == type_]


def _post(api, spec: dict) -> dict:
    resp = api.post("/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_jobs_start_from_an_imported_nanochat_run(upstream_dir, api, procs, sessions, job_succeeds):
    assert ncp(["import", "nanochat", str(upstream_dir), "--name", "upstream-d2"]) == 0
    with session_scope(sessions) as s:
        ref = mr.resolve_checkpoint(s, "upstream-d2", "base", None)
        assert (ref.step, ref.has_optimizer, ref.world_size) == (3, True, 2)

    procs.worker("data-eval", "data,eval")
    procs.worker("train", "train")

    # (a) continued pretraining, saved optimizer state: 2 ranks' shards resharded for 1 rank.
    saved = _post(
        api, {**JOB, "kind": "pretrain", "init": {"model": "upstream-d2"}, "horizon": {"num_iterations": 3}}
    )
    assert saved["stages"] and [s["name"] for s in saved["stages"]][:3] == ["data", "pretrain", "base_eval"]
    # (b) the same with a fresh optimizer; (c) an eval job and an SFT job on the model.
    fresh = _post(
        api,
        {
            **JOB,
            "kind": "pretrain",
            "stages": ["data", "pretrain"],
            "init": {"model": "upstream-d2", "step": 3},
            "resume": {"optimizer": "fresh"},
            "horizon": {"num_iterations": 3},
        },
    )
    evaluated = _post(api, {**JOB, "kind": "eval", "init": {"model": "upstream-d2"}})
    tuned = _post(api, {**JOB, "kind": "sft", "init": {"model": "upstream-d2"}})
    for job in (saved, fresh, evaluated, tuned):
        job_succeeds(job["id"], 300, "train", "data-eval")

    (init_saved,) = _events(sessions, saved["id"], "init")
    assert init_saved.message == (
        "initialised from model 'upstream-d2' base step 3: weights + optimizer state resharded 2 -> 1 ranks"
    )
    (init_fresh,) = _events(sessions, fresh["id"], "init")
    assert init_fresh.message.endswith("base step 3: weights only, fresh optimizer")

    runs = get_settings().runs_dir
    from shared.nanochat.checkpoint import load_checkpoint

    with session_scope(sessions) as s:
        stored = registry.get_job(s, saved["id"]).spec
        assert (
            stored["model"]["sequence_len"] == 64 and stored["model"]["vocab_size"] == 300
        )  # the checkpoint's
        for job in (saved, fresh):
            meta = load_checkpoint(runs / job["id"] / "base_checkpoints" / "d2", 3)[2]
            assert meta["init"]["step"] == 3 and meta["model_config"] == UPSTREAM.to_dict()
            # the new model's lineage points at the imported one
            model = mr.model_of_job(s, job["id"])
            assert model is not None and model.parent_model == "upstream-d2"
        assert load_checkpoint(runs / saved["id"] / "base_checkpoints" / "d2", 3)[2]["init"]["resharded"]
        # the eval job measured the imported model itself (its checkpoint step, its tokenizer)
        results = {r.task: r for r in registry.list_eval_results(s, evaluated["id"])}
        assert results and all(r.checkpoint_step == 3 for r in results.values())
        assert "val_bpb" in results
        tuned_model = mr.model_of_job(s, tuned["id"])
        assert tuned_model is not None and tuned_model.parent_model == "upstream-d2"
        assert mr.steps(tuned_model, "sft") == [2]
    (init_sft,) = _events(sessions, tuned["id"], "init")
    assert init_sft.message.startswith("sft starts from model 'upstream-d2' base step 3")

    # Refusals at submit name the field: no such model, no such step, a shape the checkpoint lacks.
    for bad, field, says in (
        ({"init": {"model": "nope"}}, "init.model", "model 'nope' not found"),
        ({"init": {"model": "upstream-d2", "step": 9}}, "init.step", "base steps: [3]"),
        ({"init": {"model": "upstream-d2"}, "model": {"vocab_size": 512}}, "model.vocab_size", "is 512 but"),
    ):
        resp = api.post("/jobs", json={**JOB, "kind": "eval", **bad})
        assert resp.status_code == 422 and field in resp.text and says in resp.text, resp.text

    # (d) A tokenizer that does not fit the model: refused at submit, naming both sizes ...
    tok_dir = Path(ref.tokenizer_dir or "")
    shutil.rmtree(tok_dir)
    other = tiny_corpus(get_settings().home / "other", max_bytes=120_000)[1]
    shutil.copytree(other, tok_dir)
    resp = api.post("/jobs", json={**JOB, "kind": "eval", "init": {"model": "upstream-d2"}})
    assert resp.status_code == 422, resp.text
    detail = resp.text
    assert "init.model" in detail and f"has {TINY_VOCAB} tokens" in detail and "vocab_size 300" in detail


def test_a_mismatch_found_by_the_worker_fails_the_first_stage_before_work(
    upstream_dir, sessions, submit, platform_env
):
    """The files can change between submit and run: every stage of an init job checks the
    tokenizer against the checkpoints it reads first, so even the data stage does nothing."""
    assert ncp(["import", "nanochat", str(upstream_dir), "--name", "swapped"]) == 0
    with session_scope(sessions) as s:
        ref = mr.resolve_checkpoint(s, "swapped", "base", None)
    spec = {
        **JOB,
        "kind": "eval",
        "init": {"model": "swapped"},
        "model": {
            "depth": 2,
            "aspect_ratio": 32,
            "head_dim": 32,
            "window_pattern": "L",
            "sequence_len": 64,
            "vocab_size": 300,
        },
    }
    job_id = submit(spec, enqueue=False)
    tok_dir = Path(ref.tokenizer_dir or "")
    shutil.rmtree(tok_dir)
    shutil.copytree(tiny_corpus(Path(platform_env["NCP_HOME"]) / "other", max_bytes=120_000)[1], tok_dir)
    out = run_stage(
        job_id, "data", settings=get_settings(), sessions=sessions, worker_id="w1", enqueue=lambda j, st: None
    )
    assert out == "failed"
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        data = next(st for st in job.stages if st.name == "data")
        assert job.status == "failed" and job.error_code == "model_mismatch"
        assert f"has {TINY_VOCAB} tokens" in (data.error or "") and "vocab_size 300" in (data.error or "")
        assert data.outputs is None  # no corpus was built
