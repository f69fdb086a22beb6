"""The whole way a job travels: POST /jobs (live API on PostgreSQL) -> Redis -> `ncp worker`
processes -> the registry -> the SSE stream and the `ncp jobs` CLI. Nothing imitates a worker."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import redis

from services.api.client import JobsClient, parse_sse
from services.cli.main import main as ncp
from tests.processes import Procs
from tests.servers import redis_url
from tests.tiny import tiny_spec

from .conftest import LiveServer, _empty_tables

REDIS_DB = 12  # tests/platform uses 13


@pytest.fixture(scope="module")
def platform(postgres_db, tmp_path_factory):
    """The API on a port and one data+eval worker, sharing a registry, a broker and NCP_HOME."""
    from services.api.app import create_app
    from shared.settings import Settings

    _empty_tables(postgres_db)
    root = tmp_path_factory.mktemp("real_path")
    broker = redis_url(REDIS_DB)
    r = redis.Redis.from_url(broker)
    r.flushdb()
    env = {
        "NCP_HOME": str(root / "home"),
        "NCP_DATABASE_URL": postgres_db,
        "NCP_BROKER_URL": broker,
        "NCP_DEMO_CORPUS_BYTES": "300000",
    }
    settings = Settings(home=root / "home", database_url=postgres_db, broker_url=broker)
    app = create_app(settings)
    app.state.sse_poll_seconds = 0.05
    procs = Procs(env, root / "logs")
    with LiveServer(app) as srv:
        procs.worker("data-eval", "data,eval")  # nothing consumes `train`: pretraining jobs wait
        try:
            yield {"url": srv.url, "env": env, "home": root / "home", "procs": procs}
        finally:
            procs.stop_all()
            r.flushdb()
            r.close()


@pytest.fixture
def cli_env(platform, monkeypatch):
    for k, v in platform["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NCP_API_URL", platform["url"])
    from shared.settings import get_settings

    get_settings.cache_clear()


def test_sse_follows_a_job_run_by_a_worker(platform):
    client = JobsClient(platform["url"])
    job = client.submit(tiny_spec(stages=["data", "tokenizer"]))
    events = list(client.stream_events(job["id"]))
    assert events[-1].event == "end", platform["procs"].log("data-eval")[-3000:]
    body = [e for e in events if e.event != "end"]
    seqs = [int(e.id) for e in body]
    assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, none twice
    started = [e.json()["stage"] for e in body if e.event == "stage_started"]
    assert started == ["data", "tokenizer", "report"]
    assert body[-1].event == "status" and body[-1].json()["data"]["to"] == "succeeded"
    assert client.get(job["id"])["status"] == "succeeded"

    # A reconnecting client sends Last-Event-ID and gets only what came after it.
    with httpx.stream(
        "GET",
        f"{platform['url']}/jobs/{job['id']}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(seqs[-3])},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        again = list(parse_sse(resp.iter_lines()))
    assert [int(e.id) for e in again if e.event != "end"] == seqs[-2:]
    client.close()


def test_cli_drives_real_jobs(platform, cli_env, capsys, tmp_path):
    # A job the worker runs.
    assert (
        ncp(["jobs", "submit", "--spec", _spec_file(tmp_path, tiny_spec(stages=["data", "tokenizer"]))]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("submitted job ") and "stages: data, tokenizer" in out
    job_id = out.split()[2]

    # A job no worker takes (its first stage, sft, is on `train`): cancel, conflicts, resume.
    assert ncp(["jobs", "submit", "--kind", "sft", "--set", f"parent_job_id={job_id}", "--json"]) == 0
    waiting = json.loads(capsys.readouterr().out)["id"]
    assert ncp(["jobs", "cancel", waiting[:8]]) == 0  # a short id, as `watch` prints it
    assert "cancelled" in capsys.readouterr().out
    assert ncp(["jobs", "cancel", waiting]) == 1
    assert "409" in capsys.readouterr().err
    assert ncp(["jobs", "resume", waiting]) == 0
    assert "queued" in capsys.readouterr().out
    assert ncp(["jobs", "cancel", waiting]) == 0
    capsys.readouterr()

    # Bad input and unknown ids are one-line errors.
    assert ncp(["jobs", "submit", "--preset", "demo", "--depth", "0"]) == 1
    assert "model.depth" in capsys.readouterr().err
    assert ncp(["jobs", "submit", "--kind", "eval", "--set", "parent_job_id=0000-nope"]) == 1
    assert "parent_job_id" in capsys.readouterr().err
    assert ncp(["jobs", "status", "no-such-job"]) == 1
    assert "404" in capsys.readouterr().err

    # Watch the running job by its short id to the end, then inspect it.
    assert ncp(["jobs", "watch", job_id[:8]]) == 0
    out = capsys.readouterr().out
    assert "[tokenizer] stage tokenizer succeeded" in out and "succeeded" in out
    assert ncp(["jobs", "status", job_id[:8]]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "2. tokenizer" in out and "3. report" in out
    assert ncp(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and waiting in listing

    # A job that fails in the worker: watch says how, and exits 1.
    home: Path = platform["home"]
    home.mkdir(parents=True, exist_ok=True)
    (home / "empty.txt").write_text("")
    failing = tiny_spec(stages=["data"], data={"source": "local", "path": "empty.txt"})
    assert ncp(["jobs", "submit", "--spec", _spec_file(tmp_path, failing), "--wait"]) == 1
    out = capsys.readouterr().out
    assert "stage_failed" in out and "empty.txt" in out


def _spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_import_through_the_api(platform, cli_env, capsys):
    """`ncp import nanochat --via-api --wait`: POST /models/import -> an import job on the data
    worker -> the model in GET /models/{name}; the manifest printed is the stage's outputs."""
    from shared.nanochat.demo_corpus import iter_demo_documents
    from tests.upstream import write_upstream_base_dir

    texts, size = [], 0
    for doc in iter_demo_documents():
        texts.append(doc)
        size += len(doc)
        if size > 200_000:
            break
    src = write_upstream_base_dir(platform["home"] / "datasets" / "upstream", texts)
    argv = ["import", "nanochat", "datasets/upstream", "--name", "from-api", "--via-api", "--wait", "--json"]
    assert ncp(argv) == 0, capsys.readouterr().err + platform["procs"].log("data-eval")[-3000:]
    manifest = json.loads(capsys.readouterr().out)
    dest = platform["home"] / "models" / "from-api"
    assert manifest["path"] == str(dest) and manifest["source"]["path"] == str(src.resolve())
    model = JobsClient(platform["url"]).get_model("from-api")
    assert model["name"] == "from-api" and model["path"] == str(dest), model
    # The same name again: refused at submit, naming the field; nothing is queued.
    assert ncp(["import", "nanochat", "datasets/upstream", "--name", "from-api", "--via-api"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 422" in err and "(field name)" in err and "already exists" in err
    # A local-only flag mix is refused before anything happens.
    assert ncp(["import", "nanochat", str(src), "--name", "x", "--wait"]) == 2
    assert "--wait applies to an import through the API: add --via-api" in capsys.readouterr().err
