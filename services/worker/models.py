"""Keep the model registry in step with what a job trains and exports (shared/db/model_registry.py).

One model per job: the pretrain stage creates it (name `job-<first 8 chars of the job id>`, path
the job's run folder), the SFT stage adds its sft checkpoints to the same row, and the export stage
records its folder under the model whose checkpoint it exported. Every call is idempotent, so a
redelivered or resumed stage registers again without duplicating; each waits out a registry outage
like the stage's other bookkeeping.
"""

from __future__ import annotations

import logging
from pathlib import Path

from services.worker.context import StageContext
from services.worker.inputs import source_run, stage_inputs
from shared.db import model_registry
from shared.db.outage import wait_out_outage
from shared.db.session import session_scope

log = logging.getLogger(__name__)


def _parent_model(ctx: StageContext) -> str | None:
    """The model this job continues from: its init model, or its parent job's model when the
    parent registered one."""
    if ctx.spec.init is not None:
        return ctx.spec.init.model
    if ctx.spec.parent_job_id is None:
        return None
    with session_scope(ctx.sessions) as s:
        parent = model_registry.model_of_job(s, ctx.spec.parent_job_id)
        return parent.name if parent is not None else None


def _register(ctx: StageContext, phase: str) -> str:
    tokenizer = stage_inputs(ctx).tokenizer_dir
    parent = _parent_model(ctx)
    with session_scope(ctx.sessions) as s:
        existing = model_registry.model_of_job(s, ctx.job_id)
        names = [existing.name] if existing is not None else []
        # The short name, or (taken by an import or a job with the same prefix) the full job id.
        names += [model_registry.job_model_name(ctx.job_id), f"job-{ctx.job_id}"]
        for i, name in enumerate(names):
            try:
                model_registry.register_job_model(
                    s, ctx.job_id, name, ctx.run.root, ctx.spec.checkpoint_tag, ctx.spec.model.vocab_size,
                    tokenizer if tokenizer.is_dir() else None, parent_model=parent,
                )  # fmt: skip
                break
            except model_registry.ModelExists:
                if i == len(names) - 1:
                    raise
        model_registry.refresh_checkpoints(s, name, [phase])
    return name


def register_trained_model(ctx: StageContext, phase: str) -> None:
    """After a successful pretrain (phase "base") or SFT (phase "sft") stage."""
    name = wait_out_outage(
        lambda: _register(ctx, phase), "registering the model", give_up=ctx.heartbeat.lost.is_set
    )
    ctx.event("model_registered", f"model {name!r}: {phase} checkpoints registered", {"model": name})


def record_job_export(
    ctx: StageContext, export_dir: Path, checkpoint_dir: Path, kind: str, step: int | None = None
) -> None:
    """After the export stage wrote `export_dir` from `checkpoint_dir` (kind base or sft) at `step`
    (None = its newest)."""
    from shared.nanochat.checkpoint import latest_step

    # The export is of the model that owns the checkpoint: the init model's, this job's, or its
    # parent's.
    chat = stage_inputs(ctx).chat_model
    owner = source_run(ctx, "sft" if kind == "sft" else "pretrain").root.name
    if step is None:
        step = latest_step(checkpoint_dir)

    def record() -> str | None:
        with session_scope(ctx.sessions) as s:
            if chat is not None:
                model = model_registry.get_model(s, chat.name)
            else:
                model = model_registry.model_of_job(s, owner)
            if model is None:  # trained before the model registry existed
                return None
            model_registry.record_export(
                s, model.name, export_dir, format="hf", job_id=ctx.job_id, phase=kind, step=step
            )
            return model.name

    name = wait_out_outage(record, "recording the export", give_up=ctx.heartbeat.lost.is_set)
    if name is None:
        log.info("job %s: no registered model owns %s; export not recorded", ctx.job_id, checkpoint_dir)
