"""`ncp jobs logs -f` and `ncp jobs watch`'s terminal view over a real API server: the log follower
prints every line once while a stage log grows, and the progress bars show rounded values and the
kernel line."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from rich.console import Console

from services.cli.main import main as ncp
from services.cli.watch_view import WatchView
from shared.db import registry as r
from shared.db.session import make_engine, make_session_factory
from shared.jobs.spec import demo_spec
from shared.paths import run_paths


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_logs_follow_prints_each_line_once_until_the_job_ends(
    live_server, db_url, settings, monkeypatch, capsys
):
    monkeypatch.setenv("NCP_API_URL", live_server.url)
    from shared.settings import get_settings

    get_settings.cache_clear()
    job_id = httpx.post(f"{live_server.url}/jobs", json=demo_spec().model_dump(mode="json")).json()["id"]
    logs = run_paths(settings.runs_dir, job_id).logs
    logs.mkdir(parents=True)
    (logs / "pretrain.log").write_text("".join(f"old line {i}\n" for i in range(3)))

    def write() -> None:
        engine = make_engine(db_url)
        try:
            with make_session_factory(engine)() as s:
                r.set_job_status(s, job_id, "running")
                with (logs / "pretrain.log").open("a") as f:
                    for i in range(1, 31):
                        f.write(f"step {i:05d}/00030 | loss: {4 - i / 10:.6f}\n")
                        f.flush()
                        time.sleep(0.02)
                (logs / "sft.log").write_text("step 00001/00002 | sft\nstep 00002/00002 | sft\n")
                # The follower reads the status before the files: its last pass gets every line.
                r.set_job_status(s, job_id, "cancelled")
        finally:
            engine.dispose()

    writer = threading.Thread(target=write)
    writer.start()
    assert ncp(["jobs", "logs", job_id, "-f"]) == 0
    writer.join()
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ") and "sft" not in line]
    assert steps == [f"step {i:05d}/00030 | loss: {4 - i / 10:.6f}" for i in range(1, 31)]
    assert out[0] == "==> pretrain.log <==" and out[1:4] == [f"old line {i}" for i in range(3)]
    assert out[-3:] == ["==> sft.log <==", "step 00001/00002 | sft", "step 00002/00002 | sft"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_log_follow_api_offsets(client_and_job):
    client, job_id, logs = client_and_job
    (logs / "pretrain.log").write_bytes(b"a\nbb\npartial")
    first = client.get(f"/jobs/{job_id}/logs/pretrain.log").json()
    assert first["text"] == "a\nbb\n" and first["next_offset"] == 5 and first["size"] == 12
    with (logs / "pretrain.log").open("ab") as f:
        f.write(b" line\nnext\n")
    more = client.get(f"/jobs/{job_id}/logs/pretrain.log", params={"offset": first["next_offset"]}).json()
    assert more["text"] == "partial line\nnext\n" and more["offset"] == 5
    assert client.get(f"/jobs/{job_id}/logs/other.log").status_code == 404
    assert client.get(f"/jobs/{job_id}/logs/x.txt").json()["error"]["field"] == "file"
    assert client.get(f"/jobs/{job_id}/logs/..%2F..%2Fsecret.log").status_code in (404, 422)
    big = b"".join(b"line %06d\n" % i for i in range(20_000))  # 240 kB: a follower starts near the end
    (logs / "big.log").write_bytes(big)
    tail = client.get(f"/jobs/{job_id}/logs/big.log").json()
    assert tail["text"].endswith("line 019999\n") and tail["text"].startswith("line ")
    assert 0 < len(tail["text"]) <= 64 * 1024 and tail["next_offset"] == len(big)


@pytest.fixture
def client_and_job(settings):
    from fastapi.testclient import TestClient

    from services.api.app import create_app

    with TestClient(create_app(settings)) as c:
        job_id = c.post("/jobs", json=demo_spec().model_dump(mode="json")).json()["id"]
        logs = run_paths(settings.runs_dir, job_id).logs
        logs.mkdir(parents=True)
        yield c, job_id, logs


def test_watch_view_draws_bars_rounded_values_and_kernels():
    buf = io.StringIO()
    view = WatchView(Console(file=buf, force_terminal=True, width=200, color_system=None))
    job = {
        "id": "0123456789abcdef",
        "name": "demo",
        "kind": "pipeline",
        "status": "running",
        "current_stage": "pretrain",
        "stages": [{"name": n} for n in ("data", "tokenizer", "pretrain", "report")],
        "error": None,
        "progress": {
            "percent": 62.5,
            "step": 1234,
            "total_steps": 5000,
            "loss": 3.14159265,
            "tokens_per_sec": 68012.3,
            "mfu": 0.4127,
            "eta_seconds": 3725.0,
            "peak_memory": 12.3e9,
        },
        "kernels": {
            "pretrain": {"attention": {"S": "flex", "L": "fa3"}, "dtype": "bfloat16", "peak_flops": 989e12},
        },
    }
    with view:
        view.update(job)
        view.event("12:00:00 [pretrain] checkpoint at step 1000")
    text = buf.getvalue()
    for part in (
        "01234567 demo · running",
        "stage pretrain (3/4)",
        "step 1,234/5,000",
        "loss 3.142",
        "68.0k tok/s",
        "MFU 41.3%",
        "mem 12.3 GB",
        "ETA 1h 02m",
        "kernels: attention.S flex · attention.L fa3 · dtype bfloat16 · peak_flops 989T",
        "12:00:00 [pretrain] checkpoint at step 1000",  # brackets are text, not rich markup
        "━",  # a drawn bar
    ):
        assert part in text, part


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_watch_prints_the_trainers_kernel_line(live_server, db_url, settings, monkeypatch, capsys):
    """Off a terminal, `ncp jobs watch` prints the kernel report the trainer wrote with its first
    step (the job status's `kernels`) once, as a line of its own, and `status` prints it too."""
    import json

    monkeypatch.setenv("NCP_API_URL", live_server.url)
    from shared.settings import get_settings

    get_settings.cache_clear()
    job_id = httpx.post(f"{live_server.url}/jobs", json=demo_spec().model_dump(mode="json")).json()["id"]
    run = run_paths(settings.runs_dir, job_id)
    run.root.mkdir(parents=True)
    report = {"attention": {"L": "sdpa"}, "compiled": False, "device": "cpu"}
    run.progress_file.write_text(json.dumps({"type": "progress", "step": 1, "kernels": report}) + "\n")
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            r.start_stage(s, job_id, "pretrain")
            r.update_progress(s, job_id, current_stage="pretrain", step=1, total_steps=2, loss=4.0)

        def finish() -> None:
            time.sleep(1.0)
            with make_session_factory(engine)() as s:
                r.set_job_status(s, job_id, "cancelled")

        t = threading.Thread(target=finish)
        t.start()
        assert ncp(["jobs", "watch", job_id]) == 1  # cancelled
        t.join()
    finally:
        engine.dispose()
    out = capsys.readouterr().out
    assert out.count("kernels: attention.L sdpa · compiled False · device cpu") == 1
    assert ncp(["jobs", "status", job_id]) == 0
    assert "  kernels · pretrain: attention.L sdpa · compiled False · device cpu" in capsys.readouterr().out


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_submit_fp8_flag_reaches_the_stored_spec(live_server, db_url, settings, monkeypatch, capsys):
    import json

    monkeypatch.setenv("NCP_API_URL", live_server.url)
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert ncp(["jobs", "submit", "--preset", "demo", "--fp8", "--json"]) == 0
    on = json.loads(capsys.readouterr().out)["id"]
    assert ncp(["jobs", "submit", "--preset", "demo", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)["id"]
    stored = {j: httpx.get(f"{live_server.url}/jobs/{j}").json()["spec"]["model"]["fp8"] for j in (on, off)}
    assert stored == {on: True, off: False}
    # Misaligned rows are refused at submit, naming the field (not later, in the trainer).
    odd = ["--set", "model.sequence_len=17", "--set", "batch.total_batch_size=null"]
    rc = ncp(["jobs", "submit", "--preset", "demo", "--fp8", *odd])
    assert rc == 1 and "model.fp8" in capsys.readouterr().err
