"""The pretrain and SFT stages: JobSpec -> trainer config, run the trainer, follow it, record it.

The trainer runs outside the worker process: a child process group on this node (launcher.py) or,
for `hardware.nodes > 1`, pods of a Kubernetes Job (k8s_run.py); the one follow loop (follow.py)
watches either. A stage that finds complete checkpoints from an earlier attempt (a redelivered
message, a crashed worker, a cancelled-then-resumed job) resumes from the newest one; the trainer
restores model, optimizer, data-loader and loop state from it, so the loss curve continues.

A registry outage during training pauses the bookkeeping only: progress waits in the forwarder's
buffer, cancel checks answer "no", and when training ends the stage waits for the registry to
answer before it records its result.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from services.worker.checkpoints import sync_checkpoints
from services.worker.context import LeaseLost, StageCancelled, StageContext, StageError, StageInterrupted
from services.worker.follow import FollowConfig, TrainingRun, follow
from services.worker.forwarder import ProgressForwarder
from services.worker.inputs import stage_inputs
from services.worker.launcher import LaunchConfig, LocalRun
from services.worker.models import register_trained_model
from shared.db.model_registry import ModelRef
from shared.db.outage import BACKOFF_MAX_SECONDS, wait_out_outage
from shared.jobs.init_model import describe
from shared.jobs.progress_file import StepRecord, read_records
from shared.jobs.stage_outputs import TrainOutputs
from shared.jobs.trainer_config import pretrain_config, sft_config
from shared.nanochat.init_from import InitPlan
from shared.nanochat.sft_config import SFTConfig
from shared.nanochat.train_config import TrainConfig
from shared.paths import confine, confine_tree, resolve_under_roots

log = logging.getLogger(__name__)


def latest_complete_step(ckpt_dir: Path) -> int | None:
    if not ckpt_dir.is_dir():
        return None
    from shared.nanochat.checkpoint import latest_step

    return latest_step(ckpt_dir)


def _world_size(ctx: StageContext) -> int:
    """Ranks the trainer will run on: this node's processes, or every pod's of a multi-node run."""
    return ctx.spec.hardware.world_size if ctx.spec.hardware.nodes > 1 else _nproc(ctx)


def _init_plan(ctx: StageContext, ref: ModelRef) -> InitPlan:
    """What continuing from the init model loads; refused here, before the trainer starts, when
    the checkpoint cannot give it (e.g. "saved" optimizer state it does not have)."""
    from shared.nanochat.checkpoint import CheckpointError
    from shared.nanochat.init_from import plan_init

    try:
        plan = plan_init(ref.checkpoint_dir, ref.step, ctx.spec.resume.optimizer, _world_size(ctx))
    except (CheckpointError, ValueError) as e:
        raise StageError("init_refused", f"init: {describe(ref)}: {e}") from None
    ctx.event(
        "init",
        f"initialised from {describe(ref)}: {plan.describe()}",
        {"model": ref.name, "phase": ref.phase, **plan.to_dict()},
    )
    return plan


def stage_pretrain(ctx: StageContext) -> TrainOutputs:
    inputs = stage_inputs(ctx)
    ckpt_dir = inputs.base_checkpoints
    resume_step = latest_complete_step(ckpt_dir)
    # The run's own newest checkpoint wins over the init model: a continuation that crashed
    # resumes itself (the trainer makes the same choice).
    init = (
        _init_plan(ctx, inputs.base_model) if inputs.base_model is not None and resume_step is None else None
    )
    cfg = pretrain_config(
        ctx.spec,
        data_dir=inputs.data_dir,
        tokenizer_dir=inputs.tokenizer_dir,
        checkpoint_dir=ckpt_dir,
        resume=resume_step is not None,
        init=(init.checkpoint_dir, init.step) if init is not None else None,
    )
    out = _train(ctx, "pretrain", cfg, ckpt_dir, "base", resume_step)
    register_trained_model(ctx, "base")
    return out


def stage_sft(ctx: StageContext) -> TrainOutputs:
    inputs = stage_inputs(ctx)
    out_dir = inputs.sft_checkpoints
    resume_step = latest_complete_step(out_dir)
    # Every file SFT reads is checked against the data roots here, symlinks followed; the trainer
    # gets the real paths.
    conversations = [
        confine(resolve_under_roots(s.path, ctx.roots), ctx.roots)
        for s in ctx.spec.sft.sources
        if s.kind == "conversations" and s.path
    ]
    hub = [s.path for s in ctx.spec.sft.sources if s.kind not in ("demo", "conversations") and s.path]
    tasks_dir = confine_tree(resolve_under_roots(hub[0], ctx.roots), ctx.roots) if hub else None
    if inputs.base_model is not None and resume_step is None:
        ref = inputs.base_model
        momenta = (
            ctx.spec.resume.optimizer == "saved" and ref.has_optimizer and ref.world_size == _world_size(ctx)
        )
        # SFT takes the base momenta only onto as many ranks as saved them (as from a parent job).
        loaded = "weights + optimizer momenta" if momenta else "weights only, fresh optimizer"
        ctx.event("init", f"sft starts from {describe(ref)}: {loaded}", {"model": ref.name, "step": ref.step})
    cfg = sft_config(
        ctx.spec,
        tokenizer_dir=inputs.tokenizer_dir,
        base_dir=inputs.base_checkpoints,
        base_step=inputs.base_step,
        out_dir=out_dir,
        resume=resume_step is not None,
        conversations=conversations,
        tasks_dir=tasks_dir,
    )
    out = _train(ctx, "sft", cfg, out_dir, "sft", resume_step)
    register_trained_model(ctx, "sft")
    return out


def _nproc(ctx: StageContext) -> int:
    """Training processes on this node: one per GPU the job asks for, within the worker's GPUs."""
    if ctx.settings.nproc_per_node > 0:
        return ctx.settings.nproc_per_node
    hw = ctx.spec.hardware
    if hw.device == "cpu" or not hw.gpus:
        return 1
    owned = [g for g in ctx.settings.gpus.split(",") if g.strip()]
    if owned and hw.gpus > len(owned):
        raise StageError(
            "insufficient_gpus",
            f"hardware.gpus={hw.gpus} but this train worker owns "
            f"{len(owned)} GPU(s) (NCP_GPUS={ctx.settings.gpus!r})",
        )
    return hw.gpus


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _training_run(ctx: StageContext, mode: str, cfg_path: Path) -> TrainingRun:
    if ctx.spec.hardware.nodes > 1:
        from services.worker.k8s_run import KubeRun

        return KubeRun(
            ctx.job_id, ctx.spec, ctx.settings, mode=mode, config_path=cfg_path, on_event=ctx.event
        )
    launch = LaunchConfig(
        mode=mode,
        config_path=cfg_path,
        run=ctx.run,
        nproc=_nproc(ctx),
        gpus=ctx.settings.gpus,
        cancel_grace_seconds=ctx.settings.cancel_grace_seconds,
    )
    return LocalRun(launch)


def _train(
    ctx: StageContext,
    mode: str,
    cfg: TrainConfig | SFTConfig,
    ckpt_dir: Path,
    kind: str,
    resume_step: int | None,
) -> TrainOutputs:
    cfg_path = ctx.run.root / "config" / f"{mode}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    if resume_step is not None:
        ctx.event("resume", f"{mode} resumes from checkpoint step {resume_step}", {"step": resume_step})
    forward = ProgressForwarder(ctx.sessions, ctx.job_id, ctx.stage, kind)
    if resume_step is not None:
        _replay_unforwarded(ctx, forward, resume_step)
        sync_checkpoints(ctx.sessions, ctx.job_id, ctx.stage, ckpt_dir, kind)

    run = _training_run(ctx, mode, cfg_path)
    follow_cfg = FollowConfig(
        progress_file=ctx.run.progress_file,
        stop_file=ctx.run.stop_file,
        cancel_grace_seconds=ctx.settings.cancel_grace_seconds,
    )
    result = follow(run, follow_cfg, on_records=forward, should_cancel=ctx.should_stop)
    if result.escalation:
        ctx.event(
            "stop_escalated",
            f"trainer did not stop in time: {result.escalation}",
            {"escalation": result.escalation},
        )
    _drain(ctx, forward)
    wait_out_outage(
        lambda: sync_checkpoints(ctx.sessions, ctx.job_id, ctx.stage, ckpt_dir, kind),
        "registering checkpoints",
        give_up=ctx.heartbeat.lost.is_set,
    )
    if ctx.heartbeat.lost.is_set():
        raise LeaseLost(ctx.job_id)
    if result.cancelled:
        raise StageCancelled(ctx.job_id)
    done = forward.done
    if result.returncode != 0 or done is None:
        detail = result.last_error or forward.error or f"exit code {result.returncode}"
        raise StageError(f"{mode}_failed", f"{detail}; log tail ({run.log_path}):\n{_log_tail(run.log_path)}")
    if done.stopped:
        raise StageInterrupted(f"the trainer stopped at step {done.step} without a cancel (signalled?)")
    return TrainOutputs(
        checkpoint_dir=str(ckpt_dir),
        step=done.step,
        total_steps=done.total_steps,
        checkpoint_step=done.checkpoint_step,
        last_loss=done.last_loss,
        val_bpb=done.val_bpb,
        resumed_from=resume_step,
        checkpoints=sorted(set(forward.checkpoints)),
    )


def _drain(ctx: StageContext, forward: ProgressForwarder) -> None:
    """Wait until every buffered progress record reached the registry (or the lease is gone)."""
    delay = 1.0
    while not forward.flush():
        if ctx.heartbeat.lost.is_set():
            return
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX_SECONDS)


def _replay_unforwarded(ctx: StageContext, forward: ProgressForwarder, resume_step: int) -> None:
    """Forward the steps a killed attempt trained and wrote to progress.jsonl but whose records never
    reached the registry (its worker died first). Only steps the checkpoint covers are replayed:
    later ones are trained again, identically, and forwarded live."""
    old = read_records(ctx.run.progress_file)
    mine = [r for r in old if isinstance(r, StepRecord) and r.stage == ctx.stage and r.step <= resume_step]
    if mine:
        forward(mine)
