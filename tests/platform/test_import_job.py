"""`import` jobs on the real registry: an upstream nanochat base dir, built here the way upstream
writes it, becomes a named model. The stage runs through `run_stage` for the retry and refusal
cases, and the whole job through real `ncp worker` processes on the data and eval queues."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from services.worker.pipeline import run_stage
from shared.db import model_registry, registry
from shared.db.session import session_scope
from shared.nanochat.nanochat_import import import_nanochat, read_manifest
from shared.settings import get_settings
from tests.upstream import write_upstream_base_dir

NAME = "upstream-d2"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus

    corpus = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(corpus, num_shards=2, max_bytes=200_000)
    texts = list(iter_shard_texts(split_shards(corpus)[0]))
    return write_upstream_base_dir(tmp_path_factory.mktemp("upstream") / "nanochat", texts)


@pytest.fixture
def base_dir(platform_env, upstream) -> Path:
    """A copy of the upstream dir under NCP_HOME/datasets (an allowed root)."""
    dest = Path(platform_env["NCP_HOME"]) / "datasets" / "nanochat"
    shutil.copytree(upstream, dest)
    return dest


def _spec(path: Path, name: str = NAME) -> dict:
    return {
        "kind": "import",
        "name": "bring it in",
        "import": {"source": "nanochat", "path": str(path), "name": name},
    }


def _run(sessions, job_id: str, stage: str = "import") -> str:
    return run_stage(
        job_id, stage, settings=get_settings(), sessions=sessions, worker_id="w1", enqueue=lambda j, s: None
    )


def _job(sessions, job_id):
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        return job, {st.name: st for st in job.stages}, registry.list_events(s, job_id, limit=1000)


def _models() -> list[str]:
    # NCP_HOME is the test's own; the registry database is the module's (names differ per test).
    d = get_settings().models_dir
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_import_job_through_workers(procs, sessions, submit, waiter, base_dir):
    procs.worker("data", "data")
    procs.worker("eval", "eval")
    job_id = submit(_spec(base_dir))

    def finished():
        job, _, _ = _job(sessions, job_id)
        return job.status if job.is_terminal else None

    assert waiter(finished, 120, what="import job") == "succeeded", procs.log("data")[-4000:]
    job, stages, events = _job(sessions, job_id)
    assert job.kind == "import" and list(stages) == ["import", "report"]
    out = stages["import"].outputs
    dest = get_settings().models_dir / NAME
    assert out["model"] == NAME and out["model_dir"] == str(dest) and out["reused"] is False
    assert (
        out["tokenizer_dir"] == str(dest / "tokenizer") and (dest / "tokenizer" / "tokenizer.json").is_file()
    )
    assert out["checkpoint_dirs"] == {"base/d2": str(dest / "base_checkpoints" / "d2")}
    manifest = out["manifest"]
    assert manifest == read_manifest(dest) | {"path": str(dest)}
    assert manifest["job_id"] == job_id and manifest["source"]["path"] == str(base_dir.resolve())
    assert [(c["phase"], c["tag"], c["steps"]) for c in manifest["checkpoints"]] == [("base", "d2", [3])]
    with session_scope(sessions) as s:
        model = model_registry.require_model(s, NAME)
        assert model.source == "import" and model.path == str(dest) and model.checkpoint_tag == "d2"
        assert [(c.phase, c.step) for c in model.checkpoints] == [("base", 3)]
        assert model.tokenizer_path == str(dest / "tokenizer") and model.vocab_size == 300
    imported = [e for e in events if e.type == "model_imported"]
    assert len(imported) == 1 and f"imported model {NAME!r}" in imported[0].message
    assert "base d2 steps [3]" in imported[0].message
    # The import ran on the data queue (no GPU), the report closed the job on the eval queue.
    assert "ncp.stage.import[" in procs.log("data") and "ncp.stage.report[" in procs.log("eval")
    report = Path(stages["report"].outputs["report"]).read_text()
    assert "imported_model" in report and str(dest / "base_checkpoints" / "d2") in report


def test_retried_stage_reuses_its_own_import(sessions, submit, base_dir):
    job_id = submit(_spec(base_dir, "retried"), enqueue=False)
    models = get_settings().models_dir
    # What a first attempt leaves when its worker dies after the rename, before recording success.
    import_nanochat(base_dir, models, "retried", job_id=job_id)
    assert _run(sessions, job_id) == "ran"
    _, stages, _ = _job(sessions, job_id)
    assert stages["import"].status == "succeeded" and stages["import"].outputs["reused"] is True
    with session_scope(sessions) as s:
        model = model_registry.require_model(s, "retried")
        assert model.path == str(models / "retried") and (model.manifest or {})["job_id"] == job_id

    # What an attempt that died while writing leaves: its half-written temp folder, cleared.
    half = submit(_spec(base_dir, "half"), enqueue=False)
    (models / f".half.tmp-{half}" / "tokenizer").mkdir(parents=True)
    assert _run(sessions, half) == "ran"
    _, stages, _ = _job(sessions, half)
    assert stages["import"].outputs["reused"] is False
    assert _models() == ["half", "retried"]

    # A worker that died after registering, before recording success: the registration is its own.
    late = submit(_spec(base_dir, "late"), enqueue=False)
    manifest = import_nanochat(base_dir, models, "late", job_id=late)
    with session_scope(sessions) as s:
        model_registry.register_import(s, manifest)
    assert _run(sessions, late) == "ran"

    # Another job taking the same name fails, naming it; the first model is untouched.
    other = submit(_spec(base_dir, "retried"), enqueue=False)
    assert _run(sessions, other) == "failed"
    job, _, _ = _job(sessions, other)
    assert job.status == "failed" and job.error_code == "model_exists"
    assert "import.name: model 'retried' already exists" in (job.error_message or "")
    assert read_manifest(models / "retried")["job_id"] == job_id


def test_pickle_that_is_not_an_encoding_fails_and_writes_nothing(sessions, submit, base_dir):
    (base_dir / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    job_id = submit(_spec(base_dir, "bad-pickle"), enqueue=False)
    assert _run(sessions, job_id) == "failed"
    job, stages, _ = _job(sessions, job_id)
    assert job.status == "failed" and stages["import"].status == "failed"
    assert job.error_code == "import_refused"
    assert "the pickle holds a dict, not a tiktoken Encoding" in (job.error_message or "")
    assert _models() == []  # nothing written, not even a temp folder


def test_symlink_inside_the_source_pointing_outside_is_refused(sessions, submit, base_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    pkl = base_dir / "tokenizer" / "tokenizer.pkl"
    shutil.move(pkl, outside / "tokenizer.pkl")
    pkl.symlink_to(outside / "tokenizer.pkl")
    job_id = submit(_spec(base_dir, "linked"), enqueue=False)  # the folder itself lies inside the root
    assert _run(sessions, job_id) == "failed"
    job, _, _ = _job(sessions, job_id)
    assert job.error_code == "bad_source"
    assert "import.path" in (job.error_message or "") and "outside the allowed data roots" in (
        job.error_message or ""
    )
    assert _models() == []
