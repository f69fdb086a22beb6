"""The pipeline stages: each a plain function of a StageContext that calls library code and
returns the stage's typed outputs (shared/jobs/stage_outputs.py; recorded by `pipeline.run_stage`).

Every stage is idempotent: its library call reuses completed outputs (corpus and tokenizer done
markers, checkpoints, atomic exports), so a redelivered stage costs little and never duplicates.
Training and SFT (training.py) run outside the worker process; everything else runs in it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.worker.context import StageContext, StageError, StageFn
from services.worker.import_stage import stage_import
from services.worker.inputs import file_lock, init_models, shared_dataset, stage_inputs
from services.worker.models import record_job_export
from services.worker.training import stage_pretrain, stage_sft
from shared.db import model_registry, registry
from shared.db.session import session_scope
from shared.jobs.stage_outputs import (
    DataOutputs,
    EvalOutputs,
    ExportOutputs,
    ImportOutputs,
    ReportOutputs,
    ServeOutputs,
    TokenizerOutputs,
)
from shared.jobs.stages import STAGE_NAMES
from shared.paths import confine_files, resolve_under_roots


def _numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested numeric results ({"core": {"task": 0.3}}) into {"core/task": 0.3}."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "samples":
                continue
            out.update(_numbers(v, f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix.rstrip("/")] = float(d)
    return out


# --- data and tokenizer --------------------------------------------------------------------------
def stage_data(ctx: StageContext) -> DataOutputs:
    from shared.nanochat import corpus

    data = ctx.spec.data
    if data.source == "demo":
        from shared.nanochat.demo_corpus import write_demo_corpus

        # The demo corpus depends only on its arguments: build it once, share it between jobs.
        shards = data.num_shards or 4
        out = ctx.settings.datasets_dir / f"demo-{shards}"
        with file_lock(ctx.settings.datasets_dir / f".demo-{shards}.lock"):
            report: Any = write_demo_corpus(out, num_shards=shards, max_bytes=_demo_bytes())
    elif data.source == "local":
        assert data.path is not None  # the spec requires it for local sources
        src = resolve_under_roots(data.path, ctx.roots)
        # Every file the import will read, resolved with symlinks followed and checked against the
        # roots: a folder inside a root may hold links to anywhere.
        files = confine_files(corpus.expand_sources([src]), ctx.roots)
        out = ctx.run.data
        corpus.import_local_corpus(
            files, out, text_column=data.text_column, num_train_shards=max(1, (data.num_shards or 5) - 1)
        )
        report = corpus.validate_corpus(out)
    elif data.source == "remote":
        from shared.nanochat import download

        out = ctx.run.data
        base = data.base_url or download.hf_base_url(data.repo or "")
        # The highest-numbered shard fetched is the validation shard (corpus layout). For known
        # datasets that is the dataset's own held-out last shard, as in the reference.
        val_index = download.KNOWN_VAL_INDEX.get(data.repo or "")
        n = data.num_shards or 2
        indices = (
            download.shard_indices(max(1, n - 1), val_index) if val_index is not None else list(range(n))
        )
        download.download_shards(download.shard_specs(base, indices), out)
        report = corpus.validate_corpus(out)
    else:
        raise StageError("bad_spec", f"data.source {data.source!r} is not demo, local or remote")
    return DataOutputs(data_dir=str(out), source=data.source, report=report.to_dict())


def _demo_bytes() -> int | None:
    # Tests shrink the demo corpus through the environment; the job spec has no knob for it.
    raw = os.environ.get("NCP_DEMO_CORPUS_BYTES")
    return int(raw) if raw else None


def stage_tokenizer(ctx: StageContext) -> TokenizerOutputs:
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.tokenizer import Tokenizer, compression_report, train_tokenizer

    out = ctx.run.tokenizer
    vocab = ctx.spec.tokenizer.vocab_size or ctx.spec.model.vocab_size
    train, val = split_shards(stage_inputs(ctx).data_dir)
    column = ctx.spec.data.text_column
    if (out / "tokenizer.json").is_file():
        tok = Tokenizer.load(out)  # a redelivered stage: the tokenizer was saved whole
        reused = True
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=ctx.run.root))
        tok = train_tokenizer(
            iter_shard_texts(train, column),
            vocab_size=vocab,
            out_dir=tmp,
            max_chars=ctx.spec.tokenizer.max_chars,
        )
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        reused = False
    comp = compression_report(tok, _take(iter_shard_texts(val, column), 500))
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "tokenizer", str(out), "tokenizer")
    return TokenizerOutputs(
        tokenizer_dir=str(out),
        vocab_size=tok.vocab_size,
        reused=reused,
        bytes_per_token=comp["bytes_per_token"],
    )


def _take(it: Iterator[str], n: int) -> list[str]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


# --- evaluation ----------------------------------------------------------------------------------
def stage_base_eval(ctx: StageContext) -> EvalOutputs:
    from shared.nanochat.eval.fixtures import write_fixture_bundle
    from shared.nanochat.eval.runner import run_base_eval

    inputs = stage_inputs(ctx)
    ev = ctx.spec.eval
    out = ctx.run.eval  # base_eval_<step>.json, where the report looks
    result = run_base_eval(
        inputs.base_checkpoints, inputs.base_step, inputs.tokenizer_dir, inputs.data_dir, out,
        bundle_dir=shared_dataset(ctx, "core_fixture", write_fixture_bundle),
        max_per_task=ev.core_max_per_task, device=ctx.spec.hardware.device, bpb_tokens=ev.tokens,
    )  # fmt: skip
    return _record_eval(ctx, result, out)


def stage_chat_eval(ctx: StageContext) -> EvalOutputs:
    from shared.nanochat.eval.fixtures import write_fixture_chat_tasks
    from shared.nanochat.eval.runner import run_chat_eval

    inputs = stage_inputs(ctx)
    out = ctx.run.eval  # chat_eval_<step>.json
    result = run_chat_eval(
        inputs.sft_checkpoints, inputs.sft_step, inputs.tokenizer_dir, out,
        tasks_dir=shared_dataset(ctx, "chat_fixture", write_fixture_chat_tasks),
        max_per_task=ctx.spec.eval.chat_max_per_task, device=ctx.spec.hardware.device,
    )  # fmt: skip
    return _record_eval(ctx, result, out)


def _release_accelerator_memory() -> None:
    # The eval worker outlives the model it just evaluated; hand the GPU memory back so the train
    # worker sharing the device does not find it held by a cache.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_eval(ctx: StageContext, result: dict[str, Any], out: Path) -> EvalOutputs:
    _release_accelerator_memory()
    numbers = _numbers(result)
    step = numbers.pop("step", None)
    with session_scope(ctx.sessions) as s:
        registry.record_eval_results(
            s,
            ctx.job_id,
            ctx.stage,
            int(step) if step is not None else None,
            {k: {"value": v} for k, v in numbers.items()},
        )
        registry.record_artifact(s, ctx.job_id, ctx.stage, str(out), "eval")
    return EvalOutputs(out_dir=str(out), step=None if step is None else int(step), results=numbers)


# --- export, serving, report ---------------------------------------------------------------------
def _best_checkpoint(ctx: StageContext) -> tuple[Path, str, int | None]:
    """The model to export (dir, kind, step; None = newest): the SFT checkpoint when SFT ran, else
    the base model; for a job on a registered model, the checkpoint its chat readers read."""
    inputs = stage_inputs(ctx)
    if inputs.chat_model is not None:
        return inputs.chat_model.checkpoint_dir, inputs.chat_model.phase, inputs.chat_model.step
    for kind, d in (("sft", inputs.sft_checkpoints), ("base", inputs.base_checkpoints)):
        if d.is_dir() and latest_complete(d):
            return d, kind, None
    raise StageError(
        "no_checkpoint", f"no complete checkpoint in {inputs.sft_checkpoints} or {inputs.base_checkpoints}"
    )


def latest_complete(d: Path) -> bool:
    from shared.nanochat.checkpoint import latest_step

    return latest_step(d) is not None


def served_name(ctx: StageContext) -> str:
    """The name the model server answers to: a registered model's own name when the job exports
    that model's checkpoint (an `init` job that trains nothing, e.g. POST /models/{name}/serve),
    so GET /models/served and the chat endpoint show the name the registry knows; otherwise a name
    made from the job's label and id."""
    chat = stage_inputs(ctx).chat_model
    if chat is not None:
        return chat.name
    return f"{ctx.spec.name or 'nanochat'}-{ctx.job_id[:8]}"


def _export_dtype(ctx: StageContext) -> str:
    # fp32 weights when the job runs on CPU (asked for, or "auto" on a machine without a GPU):
    # CPU serving is exact and bf16 gains nothing there.
    from shared.nanochat.device import detect_device

    device: str = ctx.spec.hardware.device
    if device == "auto":
        device = detect_device("auto").type
    return "float32" if device == "cpu" else "bfloat16"


def stage_export(ctx: StageContext) -> ExportOutputs:
    from shared.nanochat.export import export_model

    ckpt, kind, step = _best_checkpoint(ctx)
    name = served_name(ctx)
    out = export_model(
        ckpt,
        step,
        stage_inputs(ctx).tokenizer_dir,
        ctx.run.export,
        served_name=name,
        dtype=_export_dtype(ctx),
    )
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "export", str(out), "export")
    record_job_export(ctx, out, ckpt, kind, step)
    return ExportOutputs(
        export_dir=str(out), checkpoint_kind=kind, checkpoint_dir=str(ckpt), served_name=name
    )


def _export_to_publish(ctx: StageContext) -> tuple[str, str]:
    """(export folder, served name) for the serve stage: what this job's export stage wrote; else,
    for a job on a registered model, that model's recorded export of the checkpoint the job reads;
    else the parent job's export. The name is the one the export was made with, so the export's
    metadata and the published pointer agree."""
    export = ctx.stage_outputs("export", ExportOutputs)
    if export is not None:
        return export.export_dir, export.served_name
    chat = init_models(ctx).get("chat")
    if chat is not None:
        with session_scope(ctx.sessions) as s:
            recorded = model_registry.newest_export(
                model_registry.require_model(s, chat.name), chat.phase, chat.step
            )
            path = str(recorded.path) if recorded is not None else None
        if path is None:
            raise StageError(
                "no_export",
                f"model {chat.name!r} has no export of its {chat.phase} checkpoint at step {chat.step}: "
                f"add the 'export' stage before 'serve' (or POST /models/{chat.name}/serve)",
            )
        return path, chat.name
    if ctx.spec.parent_job_id is not None:
        parent = ctx.stage_outputs("export", ExportOutputs, job_id=ctx.spec.parent_job_id)
        if parent is not None:
            return parent.export_dir, parent.served_name
    return str(ctx.run.export), served_name(ctx)


def stage_serve(ctx: StageContext) -> ServeOutputs:
    from services.inference.publish import publish_model

    export_dir, name = _export_to_publish(ctx)
    published = publish_model(ctx.settings.serving_dir, name, Path(export_dir))
    return ServeOutputs(
        model=name,
        export_dir=export_dir,
        published=published,
        inference_url=ctx.settings.inference_url,
    )


def stage_report(ctx: StageContext) -> ReportOutputs:
    from shared.nanochat.eval.report import write_report

    with session_scope(ctx.sessions) as s:
        job = registry.get_job(s, ctx.job_id)
        summary = {
            "id": job.id, "kind": job.kind, "name": ctx.spec.name, "status": job.status,
            "stages": {st.name: st.status for st in job.stages},
            "created_at": job.created_at.isoformat(), "attempts": job.attempts,
            "checkpoints": [{"kind": c.kind, "step": c.step, "val_bpb": c.val_bpb}
                            for c in registry.list_checkpoints(s, job.id)],
            "eval": {f"{r.stage}/{r.task}": r.value for r in registry.list_eval_results(s, job.id)},
        }  # fmt: skip
    imported = ctx.stage_outputs("import", ImportOutputs) if ctx.spec.kind == "import" else None
    if imported is not None:  # an import job trained nothing: its report says what landed where
        summary["imported_model"] = {
            "name": imported.model, "path": imported.model_dir, "tokenizer": imported.tokenizer_dir,
            "checkpoints": imported.checkpoint_dirs, "warnings": imported.manifest.get("warnings", []),
        }  # fmt: skip
    path = write_report(ctx.run.root, summary)
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "report", str(path), "report")
    return ReportOutputs(report=str(path))


STAGE_FUNCTIONS: dict[str, StageFn] = {
    "import": stage_import,
    "data": stage_data,
    "tokenizer": stage_tokenizer,
    "pretrain": stage_pretrain,
    "base_eval": stage_base_eval,
    "sft": stage_sft,
    "chat_eval": stage_chat_eval,
    "export": stage_export,
    "serve": stage_serve,
    "report": stage_report,
}
if tuple(STAGE_FUNCTIONS) != STAGE_NAMES:  # the one stage list is shared/jobs/stages.py
    raise AssertionError(f"stage functions {list(STAGE_FUNCTIONS)} do not match the pipeline {STAGE_NAMES}")
