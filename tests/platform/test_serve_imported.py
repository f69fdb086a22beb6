"""An imported nanochat run served with one API call (issue #13), the whole way: an upstream-format
base dir (tiktoken tokenizer.pkl, a base checkpoint) imported with `ncp import nanochat`, then
POST /models/{name}/serve on the live API (PostgreSQL) -> 202 with the export-and-serve job ->
Redis -> a real `ncp worker` exports it, records the export under the model and publishes it under
the model's name -> the native server (`ncp serve --engine native`, reading the published pointer)
answers a greedy completion exactly as our model code does on the imported checkpoint with the
tokens of the imported tiktoken encoding. Then the second request publishes at once (200), and
`ncp models serve --wait` does the same from the command line."""

from __future__ import annotations

import pickle
import socket

import httpx
import pytest

from services.cli.main import main as ncp
from services.inference.publish import read_current
from shared.db import model_registry as mr
from shared.db.session import session_scope
from shared.settings import get_settings
from tests.api.conftest import LiveServer
from tests.upstream import write_upstream_base_dir

pytestmark = pytest.mark.slow

NAME = "up-served"
PROMPT = "The history of the"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def upstream_dir(tmp_path_factory):
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus

    corpus = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(corpus, num_shards=2, max_bytes=150_000)
    texts = list(iter_shard_texts(split_shards(corpus)[0]))
    return write_upstream_base_dir(tmp_path_factory.mktemp("nanochat_base"), texts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stack(platform_env, procs, monkeypatch):
    """The live API, an eval-queue worker and the inference supervisor (native engine), sharing
    NCP_HOME, the registry and the broker; the API's GET /models/served asks that supervisor."""
    from services.api.app import create_app

    port = _free_port()
    monkeypatch.setenv("NCP_INFERENCE_URL", f"http://127.0.0.1:{port}")
    get_settings.cache_clear()
    procs.worker("eval", "eval")  # export, serve and report all run on the eval queue
    procs.start("inference", "serve", "--engine", "native", "--port", str(port), "--host", "127.0.0.1")
    app = create_app(get_settings())
    app.state.sse_poll_seconds = 0.05
    with LiveServer(app) as api:
        monkeypatch.setenv("NCP_API_URL", api.url)
        get_settings.cache_clear()
        yield {"api": api.url, "inference": f"http://127.0.0.1:{port}"}
    get_settings.cache_clear()


def _served_as(url: str, name: str) -> bool:
    try:
        r = httpx.get(f"{url}/v1/models", timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [name]


def _reference_completion(upstream_dir, checkpoint_dir, step: int) -> tuple[list[int], str]:
    """(prompt ids, greedy text) from the imported checkpoint through our model code, with the
    prompt tokenized by the tiktoken encoding pickled in the upstream dir (the model's own)."""
    from shared.nanochat.checkpoint import build_model
    from shared.nanochat.engine import Engine

    with open(upstream_dir / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    ids = [enc.encode_single_token("<|bos|>"), *enc.encode_ordinary(PROMPT)]
    model, _ = build_model(checkpoint_dir, step, device="cpu")
    stops = {enc.encode_single_token("<|bos|>"), enc.encode_single_token("<|assistant_end|>")}
    seqs, _ = Engine(model).generate_batch(
        ids, 1, max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=stops
    )
    # The server leaves special tokens out of the text (as vLLM does by default).
    return ids, enc.decode([t for t in seqs[0][len(ids) :] if t not in specials])


def test_an_imported_run_is_served_with_one_api_call(
    upstream_dir, stack, procs, sessions, waiter, job_succeeds, capsys
):
    assert ncp(["import", "nanochat", str(upstream_dir), "--name", NAME]) == 0
    api = httpx.Client(base_url=stack["api"], timeout=30)

    # No export yet: 202 with the job that exports and serves the newest checkpoint (base step 3).
    r = api.post(f"/models/{NAME}/serve", json={})
    assert r.status_code == 202, r.text
    queued = r.json()
    assert (queued["model"], queued["phase"], queued["step"]) == (NAME, "base", 3)
    job_id = queued["job"]["id"]
    job_succeeds(job_id, 180, "eval")

    # The export is recorded under the model and the pointer names the model, not the job.
    model = api.get(f"/models/{NAME}").json()
    exports = [(e["phase"], e["step"], e["job_id"]) for e in model["exports"]]
    assert exports == [("base", 3, job_id)], model["exports"]
    export_dir = model["exports"][0]["path"]
    current = read_current(get_settings().serving_dir)
    assert current is not None and (current["model"], current["path"]) == (NAME, export_dir)

    # The native server picks the published export up and answers to the registered name.
    waiter(lambda: _served_as(stack["inference"], NAME), 120, 0.3, what=f"the server to serve {NAME}")
    served = api.get("/models/served").json()
    assert served["current"]["model"] == NAME
    assert [m["id"] for m in served["live"]["models"]] == [NAME], served["live"]

    # Greedy text equals our model code's on the imported checkpoint, tokenized with the imported
    # tiktoken encoding: the export carries the right tokenizer.
    with session_scope(sessions) as s:
        ref = mr.resolve_checkpoint(s, NAME, "base", 3)
    ids, expected = _reference_completion(upstream_dir, ref.checkpoint_dir, ref.step)
    out = httpx.post(
        f"{stack['inference']}/v1/completions",
        json={"model": NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert out.status_code == 200, out.text
    answer = out.json()
    assert answer["model"] == NAME and answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["choices"][0]["text"] == expected and expected

    # The export is recorded now: the second request publishes it at once, submitting nothing.
    r = api.post(f"/models/{NAME}/serve", json={"phase": "base"})
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["export_dir"]) == (NAME, export_dir) and "job" not in r.json()
    assert len(api.get("/jobs").json()["data"]) == 1

    # A job on the model with the serve stage alone publishes the model's recorded export.
    job = api.post("/jobs", json={"kind": "pipeline", "init": {"model": NAME}, "stages": ["serve"]}).json()
    job_succeeds(job["id"], 180, "eval")
    outputs = {st["name"]: st["outputs"] for st in api.get(f"/jobs/{job['id']}").json()["stages"]}
    assert (outputs["serve"]["model"], outputs["serve"]["export_dir"]) == (NAME, export_dir), outputs

    # The CLI: a second model, exported by the job `ncp models serve --wait` follows to the end.
    assert ncp(["import", "nanochat", str(upstream_dir), "--name", "up-cli"]) == 0
    # Before that, serve alone has no export of it to publish: the job fails saying what to add.
    job = api.post(
        "/jobs", json={"kind": "pipeline", "init": {"model": "up-cli"}, "stages": ["serve"]}
    ).json()
    with pytest.raises(AssertionError, match="no export of its base checkpoint at step 3"):
        job_succeeds(job["id"], 180, "eval")
    capsys.readouterr()
    assert ncp(["models", "serve", "up-cli", "--wait"]) == 0
    said = capsys.readouterr().out
    assert "exporting up-cli (base step 3) first: job " in said and said.rstrip().endswith(
        "serving up-cli (base step 3)"
    ), said
    assert ncp(["models", "serve", "up-cli"]) == 0  # exported now: published at once
    assert "serving up-cli (base step 3) from " in capsys.readouterr().out
    assert read_current(get_settings().serving_dir)["model"] == "up-cli"
