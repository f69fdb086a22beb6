"""Where a stage finds its inputs: this job's run folder, or its parent job's, and the datasets the
platform builds once under NCP_HOME/datasets.

A job that runs a producing stage (tokenizer, pretrain, sft) reads what that stage made in its own
run folder; a job that does not (an eval or SFT job on an earlier model, `parent_job_id`) reads
the parent's; a job with `init` reads a registered model's tokenizer and checkpoints, resolved
through the model registry (shared/jobs/init_model.py says which phase each stage reads).
`stage_inputs` resolves every such path once, typed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.worker.context import StageContext, StageError
from shared.db import registry
from shared.db.model_registry import ModelRef, ModelRegistryError
from shared.db.session import session_scope
from shared.jobs.init_model import check_tokenizer_fits, reads_model, resolve_init
from shared.jobs.spec import JobSpec
from shared.jobs.stage_outputs import DataOutputs
from shared.paths import RunPaths, run_paths


@dataclass(frozen=True)
class StageInputs:
    data_dir: Path  # parquet shards (this job's data stage, the parent's, or a shared dataset)
    tokenizer_dir: Path
    base_checkpoints: Path  # base_checkpoints/<tag> of the run that pretrains (or the init model's)
    sft_checkpoints: Path  # chatsft_checkpoints/<tag> of the run that fine-tunes (or the init model's)
    base_step: int | None = None  # None = the newest complete checkpoint; a step of the init model
    sft_step: int | None = None
    base_model: ModelRef | None = None  # the init checkpoint base readers read (pretrain: starts from)
    chat_model: ModelRef | None = None  # the init checkpoint chat readers read


def source_run(ctx: StageContext, producer: str) -> RunPaths:
    """The run folder holding what stage `producer` makes: this job's when it runs that stage (or
    has no parent), else the parent job's."""
    parent = ctx.spec.parent_job_id
    if producer in (ctx.spec.stages or []) or not parent:
        return ctx.run
    return run_paths(ctx.settings.runs_dir, parent)


def _spec_of(ctx: StageContext, run: RunPaths) -> JobSpec:
    if run == ctx.run:
        return ctx.spec
    with session_scope(ctx.sessions) as s:  # the parent's model shape names its folder
        return JobSpec.from_stored(dict(registry.get_job(s, run.root.name).spec))


def _data_dir(ctx: StageContext) -> Path:
    for job_id in (ctx.job_id, ctx.spec.parent_job_id):
        if job_id is None:
            continue
        out = ctx.stage_outputs("data", DataOutputs, job_id=job_id)
        if out is not None:
            return Path(out.data_dir)
    return source_run(ctx, "data").data


def init_models(ctx: StageContext) -> dict[str, ModelRef]:
    """{"base": ref, "chat": ref} of the init model's checkpoints this job reads (none without
    init), each checked against the model's tokenizer before the stage does any work."""
    init = ctx.spec.init
    if init is None:
        return {}
    refs: dict[str, ModelRef] = {}
    with session_scope(ctx.sessions) as s:
        for reader in ("base", "chat"):
            if reads_model(ctx.spec, reader):
                try:
                    refs[reader] = resolve_init(s, init, reader)
                except ModelRegistryError as e:
                    raise StageError("model_not_found", f"init: {e}") from None
    for ref in refs.values():
        try:
            check_tokenizer_fits(ref)
        except (OSError, ValueError) as e:
            raise StageError("model_mismatch", f"init.model: {e}") from None
    return refs


def stage_inputs(ctx: StageContext) -> StageInputs:
    models = init_models(ctx)
    base_run, sft_run = source_run(ctx, "pretrain"), source_run(ctx, "sft")
    base_ckpts = base_run.base_checkpoints(_spec_of(ctx, base_run).checkpoint_tag)
    sft_ckpts = sft_run.sft_checkpoints(_spec_of(ctx, sft_run).checkpoint_tag)
    tokenizer_dir = source_run(ctx, "tokenizer").tokenizer
    base_step = sft_step = None
    base, chat = models.get("base"), models.get("chat")
    ref = base or chat
    if ref is not None:
        assert ref.tokenizer_dir is not None  # init_models refused a model without one
        tokenizer_dir = ref.tokenizer_dir
    # pretrain writes its own run folder and starts from `base`; the readers read the model's
    if base is not None and "pretrain" not in ctx.spec.resolved_stages():
        base_ckpts, base_step = base.checkpoint_dir, base.step
    if chat is not None:
        sft_ckpts, sft_step = chat.checkpoint_dir, chat.step
    return StageInputs(
        data_dir=_data_dir(ctx),
        tokenizer_dir=tokenizer_dir,
        base_checkpoints=base_ckpts,
        sft_checkpoints=sft_ckpts,
        base_step=base_step,
        sft_step=sft_step,
        base_model=base,
        chat_model=chat,
    )


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes: two jobs preparing the same shared folder wait in turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_dataset(ctx: StageContext, name: str, write: Callable[[Path], object]) -> Path:
    """datasets/<name>, written once by `write(folder)` and shared by every job (the project's
    fixture CORE bundle and chat tasks)."""
    out = ctx.settings.datasets_dir / name
    with file_lock(ctx.settings.datasets_dir / f".{name}.lock"):
        if not (out / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=ctx.settings.datasets_dir))
            write(tmp)
            (tmp / ".complete").write_text("ok\n")
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
    return out
