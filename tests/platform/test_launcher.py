"""The training launcher's process handling, with real child processes.

The real trainer honours the stop file (tested end to end in test_training_flow.py); here the
child is a deliberately misbehaving program that ignores both the stop file and SIGTERM and
starts a grandchild, to prove that a cancel still frees everything: stop file, then SIGTERM,
then SIGKILL of the whole process group.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from services.worker.launcher import LaunchConfig, build_command, child_env, run_training
from shared.jobs.progress_file import DoneRecord, ProgressTail, StepRecord
from shared.paths import RunPaths

STUBBORN = r"""
import json, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = sys.argv[1:]
progress = args[args.index("--progress") + 1]
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
with open(progress, "a") as f:
    f.write(json.dumps({"type": "progress", "step": 1, "grandchild": grandchild.pid}) + "\n")
    f.flush()
    step = 1
    while True:
        time.sleep(0.2)
        step += 1
        f.write(json.dumps({"type": "progress", "step": step}) + "\n")
        f.flush()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the killed child, is gone too).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def stubborn(tmp_path):
    pkg = tmp_path / "progs"
    pkg.mkdir()
    (pkg / "stubborn_trainer.py").write_text(STUBBORN)
    return pkg


def test_cancel_escalates_to_sigkill_and_frees_the_group(tmp_path, stubborn):
    run = RunPaths(tmp_path / "run")
    (run.root / "config").mkdir(parents=True)
    cfg_path = run.root / "config" / "pretrain.json"
    cfg_path.write_text("{}")
    cfg = LaunchConfig(
        mode="pretrain",
        config_path=cfg_path,
        run=run,
        cancel_grace_seconds=1.0,
        poll_seconds=0.1,
        entry_module="stubborn_trainer",
        extra_env={"PYTHONPATH": str(stubborn)},
        gpus="3",
    )
    seen: list = []
    cancel_at = time.monotonic() + 1.5
    result = run_training(
        cfg,
        on_records=seen.extend,
        should_cancel=lambda: time.monotonic() > cancel_at,
        cancel_check_seconds=0.1,
    )
    assert result.cancelled and result.escalation == "kill"
    assert result.returncode == -9
    assert run.stop_file.exists()  # the cooperative request came first
    grandchild = seen[0].extra["grandchild"]
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the trainer's own child survived the cancel"
    steps = [r.step for r in seen]
    assert steps == sorted(steps) and len(steps) >= 3 and result.records == len(seen)
    assert not cfg.pid_path.exists()
    log = cfg.log_path.read_text()
    assert "launching:" in log and "stubborn_trainer" in log


def test_progress_tail_waits_for_whole_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text(json.dumps({"type": "progress", "step": 0}) + "\n")
    tail = ProgressTail(path)  # starts at the end: lines of an earlier attempt were forwarded then
    assert tail.read() == []
    with open(path, "a") as f:
        f.write('{"type": "progress", "step": 1}\n{"type": "prog')
    assert tail.read() == [StepRecord(step=1)]
    with open(path, "a") as f:
        f.write('ress", "step": 2}\nnot json\n')
    assert tail.read() == [StepRecord(step=2)]


def test_command_and_environment(tmp_path):
    run = RunPaths(tmp_path / "run")
    single = LaunchConfig(mode="sft", config_path=tmp_path / "c.json", run=run, gpus="0,1")
    cmd = build_command(single)
    assert cmd[1:4] == ["-m", "services.train_worker.entry", "sft"]
    assert cmd[cmd.index("--stop") + 1] == str(run.stop_file)
    env = child_env(single)
    assert env["CUDA_VISIBLE_DEVICES"] == env["HIP_VISIBLE_DEVICES"] == "0,1"
    multi = LaunchConfig(mode="pretrain", config_path=tmp_path / "c.json", run=run, nproc=2)
    assert build_command(multi)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    with pytest.raises(ValueError, match="mode"):
        LaunchConfig(mode="train", config_path=tmp_path / "c.json", run=run)
    with pytest.raises(ValueError, match="nproc"):
        LaunchConfig(mode="sft", config_path=tmp_path / "c.json", run=run, nproc=0)


@pytest.mark.slow
def test_torchrun_two_ranks_stop_together_on_cancel(tmp_path):
    """The multi-process path (torchrun, gloo on CPU): a cancel stops every rank cooperatively,
    a checkpoint is saved, and no process of the group is left."""
    from services.worker.launcher import group_alive
    from tests.tiny import tiny_corpus, tiny_train_config

    data, tok = tiny_corpus(tmp_path)
    run = RunPaths(tmp_path / "run")
    (run.root / "config").mkdir(parents=True)
    cfg_path = run.root / "config" / "pretrain.json"
    train_cfg = tiny_train_config(
        data, tok, run.root / "ckpt", num_iterations=5000, device_batch_size=2, total_batch_size=256,
        warmup_steps=1, eval_tokens=256, save_every=0, seed=1,
    )  # fmt: skip
    cfg_path.write_text(json.dumps(train_cfg.to_dict()))
    cfg = LaunchConfig(
        mode="pretrain",
        config_path=cfg_path,
        run=run,
        nproc=2,
        cancel_grace_seconds=30,
        poll_seconds=0.2,
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    seen: list = []
    pgids: list[int] = []

    def cancel() -> bool:
        if not pgids and cfg.pid_path.exists():
            pgids.append(int(cfg.pid_path.read_text()))
        return any(isinstance(r, StepRecord) and r.step >= 2 for r in seen)

    result = run_training(cfg, on_records=seen.extend, should_cancel=cancel, cancel_check_seconds=0.2)
    assert result.returncode == 0 and result.cancelled and result.escalation is None, (
        cfg.log_path.read_text()[-3000:]
    )
    done = [r for r in seen if isinstance(r, DoneRecord)]
    assert done and done[0].stopped is True and done[0].step < 5000
    assert any(r.TYPE == "checkpoint" and r.step == done[0].step for r in seen)
    assert pgids and not group_alive(pgids[0])
    assert "torch.distributed.run" in cfg.log_path.read_text()
