"""The `import` stage: an upstream nanochat base dir becomes a named platform model.

The library call (shared/nanochat/nanochat_import.py) reads and verifies everything before it
writes, into a temp folder renamed into place; this stage adds what a job needs around it:
- the source folder is checked again when it is read, every entry with symlinks followed (the spec
  was checked at submit; the folder may hold links to anywhere, or have changed since);
- a retry after a worker crash finds the model its own earlier attempt renamed into place (the
  manifest records the job id) and reuses it instead of failing on "name exists"; the same for
  its registration;
- a name the model registry already holds is refused before anything is written; the model is
  registered (shared/db/model_registry.py) and the job's events carry the summary.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from services.worker.context import StageContext, StageError
from shared.db import model_registry, registry
from shared.db.session import session_scope
from shared.jobs.stage_outputs import ImportOutputs
from shared.paths import PathEscapeError, confine_tree, resolve_under_roots


def _earlier_attempt(dest: Path, job_id: str) -> dict[str, Any] | None:
    """The manifest at `dest` when this job's own earlier attempt wrote it; else None."""
    from shared.nanochat.nanochat_import import read_manifest

    if not dest.is_dir():
        return None
    try:
        manifest = read_manifest(dest)
    except ValueError:
        return None  # not a model folder we wrote: the importer refuses the name, naming it
    return manifest if manifest.get("job_id") == job_id else None


def _summary(manifest: dict[str, Any]) -> str:
    tok = manifest.get("tokenizer")
    parts = [f"tokenizer {tok['vocab_size']} tokens" if tok else "no tokenizer"]
    for c in manifest.get("checkpoints", []):
        parts.append(f"{c['phase']} {c['tag']} steps {c['steps']}")
    text = f"imported model {manifest['name']!r} ({'; '.join(parts)}) -> {manifest['path']}"
    warnings = manifest.get("warnings") or []
    return text + "".join(f"; warning: {w}" for w in warnings)


def _ours(manifest: dict[str, Any] | None, job_id: str) -> bool:
    return (manifest or {}).get("job_id") == job_id


def stage_import(ctx: StageContext) -> ImportOutputs:
    from shared.nanochat.nanochat_import import NanochatImportError, import_nanochat

    spec = ctx.spec.import_
    if spec is None:  # the spec refuses kind 'import' without it; a hand-edited row is named
        raise StageError("bad_spec", "import: the job spec has no import section")
    try:
        src = confine_tree(resolve_under_roots(spec.path, ctx.roots), ctx.roots)
    except (PathEscapeError, OSError) as e:  # OSError: missing, unreadable, name too long
        raise StageError("bad_source", f"import.path: {e}") from None
    with session_scope(ctx.sessions) as s:
        held = model_registry.get_model(s, spec.name)
        # A name taken since submit is refused before anything is written; our own earlier
        # attempt's registration is not a conflict.
        if held is not None and not _ours(held.manifest, ctx.job_id):
            raise StageError(
                "model_exists",
                f"import.name: model {spec.name!r} already exists ({held.source} model at {held.path})",
            )
    dest = ctx.settings.models_dir / spec.name
    manifest = _earlier_attempt(dest, ctx.job_id)
    reused = manifest is not None
    if manifest is None:
        try:
            manifest = import_nanochat(src, ctx.settings.models_dir, spec.name, job_id=ctx.job_id)
        except NanochatImportError as e:
            raise StageError("import_refused", str(e)) from None
    if held is None:
        try:
            with session_scope(ctx.sessions) as s:
                model_registry.register_import(s, manifest)
        except model_registry.ModelExists as e:  # registered concurrently under the same name
            if not reused:
                shutil.rmtree(dest, ignore_errors=True)
            raise StageError("model_exists", f"import.{e}") from None
    with session_scope(ctx.sessions) as s:
        registry.record_artifact(s, ctx.job_id, "model", str(dest), "model")
    tok = manifest.get("tokenizer")
    ckpts = {f"{c['phase']}/{c['tag']}": str(dest / c["path"]) for c in manifest.get("checkpoints", [])}
    ctx.event(
        "model_imported",
        _summary(manifest),
        data={"model": spec.name, "path": str(dest), "checkpoints": list(ckpts), "reused": reused},
    )
    return ImportOutputs(
        model=spec.name,
        model_dir=str(dest),
        tokenizer_dir=str(dest / tok["path"]) if tok else None,
        checkpoint_dirs=ckpts,
        manifest=manifest,
        reused=reused,
    )
