"""A slow kernel fallback becomes one `warning` event per trainer run: the trainer's progress file
(written by the real ProgressWriter), the real forwarder, the real registry (PostgreSQL), read back
through the API's events endpoint.

On CPU a kernel report lists no slow fallbacks (they are a GPU matter), so the records here carry
reports written as a GPU trainer writes them.
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from services.api.app import create_app
from services.worker.forwarder import ProgressForwarder
from shared.jobs.progress_file import ProgressTail, ProgressWriter, read_records
from shared.paths import run_paths
from shared.settings import get_settings

SDPA = "windowed attention layers run SDPA with a dense T x T mask (fa3: no flash_attn_interface module)"
EAGER = "the model runs eager: torch.compile is off (compile=false)"


def report(*slow: str) -> dict:
    return {
        "device": "NVIDIA H100 80GB HBM3",
        "attention": {"windowed": "sdpa"},
        "slow_fallbacks": list(slow),
    }


def write_run(path, stage: str, first_step: int, kernels: dict) -> None:
    """What a (re)started trainer writes: its first step with the kernel report, then plain steps."""
    w = ProgressWriter(path, enabled=True, stage=stage)
    try:
        w.write("progress", {"step": first_step, "total_steps": 10, "loss": 4.0, "kernels": kernels})
        for step in range(first_step + 1, first_step + 4):
            w.write("progress", {"step": step, "total_steps": 10, "loss": 4.0 - step / 10})
    finally:
        w.close()


def warnings(client: TestClient, job_id: str) -> list[dict]:
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 500}).json()["data"]
    return [e for e in events if e["type"] == "warning"]


def test_slow_fallbacks_warn_once_per_trainer_run(sessions, submit, make_spec, platform_env):
    job_id = submit(make_spec(stages=["data", "tokenizer", "pretrain", "sft"]), enqueue=False)
    progress = run_paths(get_settings().runs_dir, job_id).progress_file
    pretrain = ProgressForwarder(sessions, job_id, "pretrain", "base")
    sft = ProgressForwarder(sessions, job_id, "sft", "sft")
    tail = ProgressTail(progress, start_at_end=False)

    write_run(progress, "pretrain", 1, report(SDPA, EAGER))
    write_run(progress, "sft", 1, report())  # no slow fallback: no warning
    records = tail.read()
    pretrain(records)
    sft(records)
    assert pretrain.flush() and sft.flush()

    with TestClient(create_app(get_settings())) as client:
        (warn,) = warnings(client, job_id)
        assert warn["stage"] == "pretrain" and SDPA in warn["message"] and EAGER in warn["message"]
        assert "NVIDIA H100" in warn["message"] and warn["data"]["causes"] == [SDPA, EAGER]

        # A worker restart: a new forwarder replays the same records. Nothing is added.
        again = ProgressForwarder(sessions, job_id, "pretrain", "base")
        again(read_records(progress))
        assert again.flush()
        assert len(warnings(client, job_id)) == 1

        # A resumed run of the stage writes a first record of its own: it is warned about too.
        time.sleep(0.01)  # a later record time, as a real restart has
        write_run(progress, "pretrain", 3, report(EAGER))
        again(tail.read())
        assert again.flush()
        first, second = warnings(client, job_id)
        assert first == warn and second["stage"] == "pretrain"
        assert second["message"].endswith(f": {EAGER}") and second["data"]["step"] == 3
        # The job status shows the first report of each stage.
        kernels = client.get(f"/jobs/{job_id}").json()["kernels"]
        assert kernels == {"pretrain": report(SDPA, EAGER), "sft": report()}
