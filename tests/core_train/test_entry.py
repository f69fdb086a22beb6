"""The torchrun child entrypoint, run as a real subprocess (and under torchrun with 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shared.nanochat.checkpoint import latest_step, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_config(tmp_path: Path, cfg) -> Path:
    p = tmp_path / "config.json"
    d = cfg.to_dict()
    p.write_text(json.dumps(d))
    return p


def _cmd(mode: str, config: Path, tmp_path: Path, nproc: int = 1) -> list[str]:
    args = [
        mode,
        "--config",
        str(config),
        "--progress",
        str(tmp_path / "progress.jsonl"),
        "--stop",
        str(tmp_path / "STOP"),
    ]
    if nproc == 1:
        return [sys.executable, "-m", "services.train_worker.entry", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "services.train_worker.entry",
        *args,
    ]


def test_entry_runs_to_completion_and_reports(tiny_config, tmp_path):
    cfg = tiny_config(num_iterations=4, eval_every=2, save_every=2)
    proc = subprocess.run(
        _cmd("pretrain", _write_config(tmp_path, cfg), tmp_path),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    recs = _records(tmp_path / "progress.jsonl")
    kinds = [r["type"] for r in recs]
    assert kinds.count("progress") == 4 and kinds.count("eval") == 3 and kinds.count("checkpoint") == 2
    assert kinds[-1] == "done"
    done = recs[-1]
    assert done["step"] == 4 and done["stopped"] is False and done["checkpoint_step"] == 4
    ck = [r for r in recs if r["type"] == "checkpoint"][-1]
    assert Path(ck["path"]).name == "meta_000004.json" and "model_000004.pt" in ck["files"]
    assert all(isinstance(r["time"], float) for r in recs)
    prog = [r for r in recs if r["type"] == "progress"]
    assert [p["step"] for p in prog] == [1, 2, 3, 4] and all("tokens_per_sec" in p for p in prog)
    # the stage log (stdout) gets readable step lines: the first and the last step at least
    lines = proc.stdout.splitlines()
    assert any(line.startswith("step 00001/00004 (25.00%) | loss: ") for line in lines), proc.stdout
    last = next(line for line in lines if line.startswith("step 00004/00004 (100.00%)"))
    for part in ("| lrm: ", "| dt: ", "ms | tok/sec: ", "| mfu: ", "| elapsed: ", "| eta: "):
        assert part in last, last
    assert any("validation bpb: " in line for line in lines) and any(
        "checkpoint saved" in line for line in lines
    )
    # The kernel report rides on the first progress line only (docs/ARCHITECTURE.md).
    assert prog[0]["kernels"]["attention"] == {"full": "sdpa"} and prog[0]["kernels"]["fp8"] is False
    assert all("kernels" not in p for p in prog[1:])


def test_entry_honours_stop_file(tiny_config, tmp_path):
    cfg = tiny_config(num_iterations=5000)
    proc = subprocess.Popen(
        _cmd("pretrain", _write_config(tmp_path, cfg), tmp_path),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not any(r["type"] == "progress" for r in _records(tmp_path / "progress.jsonl")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "no progress line within 120 s"
            time.sleep(0.1)
        (tmp_path / "STOP").touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    recs = _records(tmp_path / "progress.jsonl")
    done = recs[-1]
    assert done["type"] == "done" and done["stopped"] is True and 0 < done["step"] < 5000
    assert recs[-2]["type"] == "checkpoint" and recs[-2]["step"] == done["step"]
    assert latest_step(cfg.checkpoint_dir) == done["step"]


def test_entry_bad_config_exit_2_with_error_record(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": "d", "tokenizer_dir": "t", "checkpoint_dir": "c", "depth": -1}))
    proc = subprocess.run(
        _cmd("pretrain", config, tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    (rec,) = _records(tmp_path / "progress.jsonl")
    assert rec["type"] == "error" and "depth" in rec["message"]


def test_entry_training_failure_exit_1(tiny_config, tmp_path):
    cfg = tiny_config(data_dir=str(tmp_path / "no_such_corpus"))
    proc = subprocess.run(
        _cmd("pretrain", _write_config(tmp_path, cfg), tmp_path),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    rec = _records(tmp_path / "progress.jsonl")[-1]
    assert rec["type"] == "error" and "no_such_corpus" in rec["message"] and rec["traceback"]


def test_entry_under_torchrun_two_cpu_ranks(tiny_config, tmp_path):
    # 512 tokens/step = 2 ranks x 4 rows x 64 tokens: no accumulation, gradients reduced in the optimizer
    cfg = tiny_config(num_iterations=3, eval_every=3)
    proc = subprocess.run(
        _cmd("pretrain", _write_config(tmp_path, cfg), tmp_path, nproc=2),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "progress.jsonl")
    assert [r["step"] for r in recs if r["type"] == "progress"] == [1, 2, 3]  # rank 0 only writes
    assert recs[-1]["type"] == "done" and recs[-1]["step"] == 3
    _, optim1, meta = load_checkpoint(cfg.checkpoint_dir, load_optimizer=True, rank=1)
    assert meta["world_size"] == 2 and len(meta["dataloader_states"]) == 2
    assert {"optim_000003_rank0.pt", "optim_000003_rank1.pt"} <= set(meta["files"])
    assert meta["plan"]["grad_accum_steps"] == 1


def test_entry_sft_mode(tiny_config, tmp_path):
    base = tiny_config(num_iterations=2, checkpoint_dir=str(tmp_path / "base"))
    from shared.nanochat.train import train

    train(base)
    config = tmp_path / "sft.json"
    config.write_text(
        json.dumps(
            {
                "base_checkpoint_dir": base.checkpoint_dir,
                "tokenizer_dir": base.tokenizer_dir,
                "out_dir": str(tmp_path / "sft"),
                "mixture": "demo",
                "num_iterations": 2,
                "device_batch_size": 2,
                "device": "cpu",
            }
        )
    )
    proc = subprocess.run(
        _cmd("sft", config, tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "progress.jsonl")
    assert recs[-1]["type"] == "done" and recs[-1]["mode"] == "sft" and recs[-1]["step"] == 2
    assert any(r["type"] == "checkpoint" for r in recs)
    assert latest_step(tmp_path / "sft") == 2
