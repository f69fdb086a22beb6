"""The pipeline stages: each a plain function of a StageContext that calls library code and
returns the stage's outputs (recorded by `pipeline.run_stage`).

Every stage is idempotent: its library call reuses completed outputs (corpus and tokenizer done
markers, checkpoints, atomic exports), so a redelivered stage costs little and never duplicates.
Training and SFT run in a child process group (launcher.py); everything else runs in the worker.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.worker.pipeline import StageContext, StageError, StageFn
from services.worker.training import run_pretrain, run_sft
from shared.db import registry
from shared.db.session import session_scope
from shared.paths import RunPaths, resolve_under_roots, run_paths


# --- shared helpers ----------------------------------------------------------------------------
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


def source_run(ctx: StageContext, producer: str) -> RunPaths:
    """The run folder holding what stage `producer` makes: this job's when it runs that stage (or
    has no parent), else the parent job's (an eval or SFT job on an earlier job's model)."""
    parent = ctx.spec.get("parent_job_id")
    if producer in (ctx.spec.get("stages") or []) or not parent:
        return ctx.run
    return run_paths(ctx.settings.runs_dir, parent)


def tokenizer_dir(ctx: StageContext) -> Path:
    return source_run(ctx, "tokenizer").tokenizer


def data_dir(ctx: StageContext) -> Path:
    out = ctx.stage_outputs("data").get("data_dir")
    if out:
        return Path(out)
    parent = ctx.spec.get("parent_job_id")
    if parent:
        with session_scope(ctx.sessions) as s:
            row = registry.get_stage(s, parent, "data")
            if row is not None and row.outputs and row.outputs.get("data_dir"):
                return Path(row.outputs["data_dir"])
    return source_run(ctx, "data").data


def ckpt_tag(spec: dict[str, Any]) -> str:
    return f"d{spec['model']['depth']}"  # the reference layout: base_checkpoints/d12/


def _producer_spec(ctx: StageContext, run: RunPaths) -> dict[str, Any]:
    if run == ctx.run:
        return ctx.spec
    with session_scope(ctx.sessions) as s:  # the parent's model shape names its folder
        return dict(registry.get_job(s, run.root.name).spec)


def base_ckpt_dir(ctx: StageContext) -> Path:
    run = source_run(ctx, "pretrain")
    return run.base_checkpoints(ckpt_tag(_producer_spec(ctx, run)))


def sft_ckpt_dir(ctx: StageContext) -> Path:
    run = source_run(ctx, "sft")
    return run.sft_checkpoints(ckpt_tag(_producer_spec(ctx, run)))


def device(ctx: StageContext) -> str:
    return str(ctx.spec.get("hardware", {}).get("device", "auto"))


def fixture_dir(ctx: StageContext, name: str, writer_name: str) -> Path:
    """The project's fixture CORE bundle / chat tasks, written once under datasets/ and shared."""
    from shared.nanochat.eval import fixtures

    out = ctx.settings.datasets_dir / name
    with file_lock(ctx.settings.datasets_dir / f".{name}.lock"):
        if not (out / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=ctx.settings.datasets_dir))
            getattr(fixtures, writer_name)(tmp)
            (tmp / ".complete").write_text("ok\n")
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
    return out


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


# --- stages ------------------------------------------------------------------------------------
def stage_data(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat import corpus

    data = ctx.spec["data"]
    source = data["source"]
    num_shards = data.get("num_shards")
    if source == "demo":
        from shared.nanochat.demo_corpus import write_demo_corpus

        # The demo corpus depends only on its arguments: build it once, share it between jobs.
        shards = num_shards or 4
        out = ctx.settings.datasets_dir / f"demo-{shards}"
        with file_lock(ctx.settings.datasets_dir / f".demo-{shards}.lock"):
            report = write_demo_corpus(out, num_shards=shards, max_bytes=_demo_bytes())
    elif source == "local":
        roots = [ctx.settings.home, *ctx.settings.data_roots]
        src = resolve_under_roots(data["path"], roots)
        out = ctx.run.data
        report = corpus.import_local_corpus(
            [src], out, text_column=data.get("text_column", "text"),
            num_train_shards=max(1, (num_shards or 5) - 1),
        )  # fmt: skip
    elif source == "remote":
        from shared.nanochat import download

        out = ctx.run.data
        base = data.get("base_url") or download.hf_base_url(data["repo"])
        # The highest-numbered shard fetched is the validation shard (corpus layout). For known
        # datasets that is the dataset's own held-out last shard, as in the reference.
        val_index = download.KNOWN_VAL_INDEX.get(data.get("repo") or "")
        n = num_shards or 2
        indices = (
            download.shard_indices(max(1, n - 1), val_index) if val_index is not None else list(range(n))
        )
        download.download_shards(download.shard_specs(base, indices), out)
        report = None
    else:
        raise StageError("bad_spec", f"data.source {source!r} is not demo, local or remote")
    validated = corpus.validate_corpus(out) if source != "demo" else report
    return {"data_dir": str(out), "source": source, "report": _report_dict(validated)}


def _demo_bytes() -> int | None:
    # Tests shrink the demo corpus through the environment; the job spec has no knob for it.
    raw = os.environ.get("NCP_DEMO_CORPUS_BYTES")
    return int(raw) if raw else None


def _report_dict(report: Any) -> dict[str, Any]:
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    return {"value": str(report)}


def stage_tokenizer(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.tokenizer import Tokenizer, compression_report, train_tokenizer

    out = ctx.run.tokenizer
    spec_tok = ctx.spec.get("tokenizer", {})
    vocab = spec_tok.get("vocab_size") or ctx.spec["model"]["vocab_size"]
    ddir = data_dir(ctx)
    train, val = split_shards(ddir)
    column = ctx.spec["data"].get("text_column", "text")
    if (out / "tokenizer.json").is_file():
        tok = Tokenizer.load(out)  # a redelivered stage: the tokenizer was saved whole
        reused = True
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=ctx.run.root))
        tok = train_tokenizer(
            iter_shard_texts(train, column),
            vocab_size=vocab,
            out_dir=tmp,
            max_chars=spec_tok.get("max_chars", 2_000_000_000),
        )
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        reused = False
    comp = compression_report(tok, _take(iter_shard_texts(val, column), 500))
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "tokenizer", str(out), "tokenizer")
    return {
        "tokenizer_dir": str(out),
        "vocab_size": tok.vocab_size,
        "reused": reused,
        "bytes_per_token": comp["bytes_per_token"],
    }


def _take(it: Iterator[str], n: int) -> list[str]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


def stage_pretrain(ctx: StageContext) -> dict[str, Any]:
    return run_pretrain(
        ctx, data_dir=data_dir(ctx), tokenizer_dir=tokenizer_dir(ctx), ckpt_dir=base_ckpt_dir(ctx)
    )


def stage_sft(ctx: StageContext) -> dict[str, Any]:
    return run_sft(
        ctx, tokenizer_dir=tokenizer_dir(ctx), base_dir=base_ckpt_dir(ctx), out_dir=sft_ckpt_dir(ctx)
    )


def stage_base_eval(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat.eval.runner import run_base_eval

    ev = ctx.spec.get("eval", {})
    out = ctx.run.eval  # base_eval_<step>.json, where the report looks
    result = run_base_eval(
        base_ckpt_dir(ctx), None, tokenizer_dir(ctx), data_dir(ctx), out,
        bundle_dir=fixture_dir(ctx, "core_fixture", "write_fixture_bundle"),
        max_per_task=ev.get("core_max_per_task"), device=device(ctx),
        bpb_tokens=int(ev.get("tokens") or 1 << 20),
    )  # fmt: skip
    return _record_eval(ctx, result, out)


def stage_chat_eval(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat.eval.runner import run_chat_eval

    ev = ctx.spec.get("eval", {})
    out = ctx.run.eval  # chat_eval_<step>.json
    result = run_chat_eval(
        sft_ckpt_dir(ctx), None, tokenizer_dir(ctx), out,
        tasks_dir=fixture_dir(ctx, "chat_fixture", "write_fixture_chat_tasks"),
        max_per_task=ev.get("chat_max_per_task"), device=device(ctx),
    )  # fmt: skip
    return _record_eval(ctx, result, out)


def _release_accelerator_memory() -> None:
    # The eval worker outlives the model it just evaluated; hand the GPU memory back so the train
    # worker sharing the device does not find it held by a cache.
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_eval(ctx: StageContext, result: dict[str, Any], out: Path) -> dict[str, Any]:
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
    return {"out_dir": str(out), "step": step, "results": numbers}


def _best_checkpoint(ctx: StageContext) -> tuple[Path, str]:
    """The model to export: the SFT checkpoint when SFT ran, else the base model."""
    from shared.nanochat.checkpoint import latest_step

    for kind, d in (("sft", sft_ckpt_dir(ctx)), ("base", base_ckpt_dir(ctx))):
        if d.is_dir() and latest_step(d) is not None:
            return d, kind
    raise StageError(
        "no_checkpoint", f"no complete checkpoint in {sft_ckpt_dir(ctx)} or {base_ckpt_dir(ctx)}"
    )


def served_name(ctx: StageContext) -> str:
    name = ctx.spec.get("name") or "nanochat"
    return f"{name}-{ctx.job_id[:8]}"


def stage_export(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat.export import export_model

    ckpt, kind = _best_checkpoint(ctx)
    # fp32 weights when the job trained on CPU: CPU serving is exact and bf16 gains nothing there.
    dtype = "float32" if device(ctx) == "cpu" else "bfloat16"
    out = export_model(
        ckpt, None, tokenizer_dir(ctx), ctx.run.export, served_name=served_name(ctx), dtype=dtype
    )
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "export", str(out), "export")
    return {
        "export_dir": str(out),
        "checkpoint_kind": kind,
        "checkpoint_dir": str(ckpt),
        "served_name": served_name(ctx),
    }


def stage_serve(ctx: StageContext) -> dict[str, Any]:
    from services.inference.publish import publish_model

    export_dir = ctx.stage_outputs("export").get("export_dir") or str(ctx.run.export)
    published = publish_model(ctx.settings.serving_dir, served_name(ctx), Path(export_dir))
    return {
        "model": served_name(ctx),
        "export_dir": export_dir,
        "published": published,
        "inference_url": ctx.settings.inference_url,
    }


def stage_report(ctx: StageContext) -> dict[str, Any]:
    from shared.nanochat.eval.report import write_report

    with session_scope(ctx.sessions) as s:
        job = registry.get_job(s, ctx.job_id)
        summary = {
            "id": job.id, "kind": job.kind, "name": job.spec.get("name"), "status": job.status,
            "stages": {st.name: st.status for st in job.stages},
            "created_at": job.created_at.isoformat(), "attempts": job.attempts,
            "checkpoints": [{"kind": c.kind, "step": c.step, "val_bpb": c.val_bpb}
                            for c in registry.list_checkpoints(s, job.id)],
            "eval": {f"{r.stage}/{r.task}": r.value for r in registry.list_eval_results(s, job.id)},
        }  # fmt: skip
    path = write_report(ctx.run.root, summary)
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "report", str(path), "report")
    return {"report": str(path)}


STAGE_FUNCTIONS: dict[str, StageFn] = {
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
