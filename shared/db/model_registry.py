"""The model registry: which models exist, where their files are, which checkpoints they hold.

A model is an imported nanochat run (`ncp import nanochat`) or the model a job trained (one model
per job: its base and SFT checkpoints are phases of the same row). Every model's files are in the
run-folder layout (tokenizer/, base_checkpoints/<tag>/, chatsft_checkpoints/<tag>/), so whatever
takes a run folder takes a model. `resolve_checkpoint` turns (name, phase, step) into the paths a
job or an export needs, from the registry alone (no torch: the API calls it too).

Writes follow the run registry's rules (shared/db/registry.py): each function is one unit of
work that opens a write transaction and commits; a concurrent insert of the same row (unique
constraint) is retried once and then finds that row, so a re-run or resumed job never duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.models import MODEL_PHASES, Model, ModelCheckpoint, ModelExport, utcnow
from shared.db.session import begin_write
from shared.nanochat.nanochat_import import PHASE_DIRS, validate_name


class ModelRegistryError(ValueError):
    """A model-registry refusal; the message names the model (and phase, step) concerned."""


class ModelNotFound(ModelRegistryError, LookupError):
    def __init__(self, name: str):
        super().__init__(f"model {name!r} not found")
        self.name = name


class ModelExists(ModelRegistryError):
    def __init__(self, name: str, where: str):
        super().__init__(f"name: model {name!r} already exists ({where}); pick another name")
        self.name = name


class CheckpointNotFound(ModelRegistryError, LookupError):
    """No checkpoint of a model at the phase/step asked for; says which steps there are."""


@dataclass(frozen=True)
class ModelRef:
    """One checkpoint of a registered model, resolved to paths: what a job or an export starts from."""

    name: str
    root: Path  # the model's run-folder-layout root
    tag: str | None
    phase: str
    step: int
    checkpoint_dir: Path  # holds model_<step>.pt, meta_<step>.json (+ optim_<step>_rank<r>.pt)
    tokenizer_dir: Path | None  # None: the model was imported without a tokenizer
    has_optimizer: bool
    world_size: int | None  # ranks that saved the optimizer state (resharding needs it)


# Names a model cannot have: API paths under /models that are not model names.
RESERVED_NAMES = frozenset({"served"})


def check_name(name: str) -> str:
    """nanochat_import.validate_name's rule, minus the reserved names."""
    validate_name(name)
    if name in RESERVED_NAMES:
        raise ModelRegistryError(f"name: {name!r} is reserved (GET /models/{name} is another route)")
    return name


def job_model_name(job_id: str) -> str:
    """The registry name of the model job `job_id` trains (valid under validate_name)."""
    return f"job-{job_id[:8]}"


def _check_phase(phase: str) -> str:
    if phase not in MODEL_PHASES:
        raise ModelRegistryError(f"phase: {phase!r} is not one of {list(MODEL_PHASES)}")
    return phase


# --- reads -----------------------------------------------------------------------------------------
def get_model(session: Session, name: str) -> Model | None:
    return session.scalars(select(Model).where(Model.name == name)).one_or_none()


def require_model(session: Session, name: str) -> Model:
    model = get_model(session, name)
    if model is None:
        raise ModelNotFound(name)
    return model


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.created_at.desc(), Model.id.desc())))


def model_of_job(session: Session, job_id: str) -> Model | None:
    return session.scalars(
        select(Model).where(Model.source == "job", Model.source_job_id == job_id)
    ).one_or_none()


def steps(model: Model, phase: str) -> list[int]:
    return sorted(c.step for c in model.checkpoints if c.phase == phase)


def latest_steps(model: Model) -> dict[str, int]:
    """Newest step per phase that has checkpoints, e.g. {"base": 5000, "sft": 700}."""
    out: dict[str, int] = {}
    for c in model.checkpoints:
        out[c.phase] = max(out.get(c.phase, c.step), c.step)
    return {p: out[p] for p in MODEL_PHASES if p in out}


def resolve_checkpoint(session: Session, name: str, phase: str, step: int | None) -> ModelRef:
    """Checkpoint `step` (None = the newest) of `phase` of model `name`; raises ModelNotFound or
    CheckpointNotFound (both ValueErrors) naming the model, the phase and the steps that exist."""
    _check_phase(phase)
    model = require_model(session, name)
    have = {c.step: c for c in model.checkpoints if c.phase == phase}
    if not have:
        other = latest_steps(model)
        raise CheckpointNotFound(
            f"model {name!r} has no {phase} checkpoint"
            + (f" (it has: {', '.join(f'{p} up to step {s}' for p, s in other.items())})" if other else "")
        )
    chosen = max(have) if step is None else step
    if chosen not in have:
        raise CheckpointNotFound(
            f"step: model {name!r} has no {phase} checkpoint at step {step}; {phase} steps: {sorted(have)}"
        )
    ckpt = have[chosen]
    return ModelRef(
        name=model.name,
        root=Path(model.path),
        tag=model.checkpoint_tag,
        phase=phase,
        step=chosen,
        checkpoint_dir=Path(ckpt.path),
        tokenizer_dir=Path(model.tokenizer_path) if model.tokenizer_path else None,
        has_optimizer=ckpt.has_optimizer,
        world_size=ckpt.optimizer_world_size,
    )


# --- writes ----------------------------------------------------------------------------------------
def _commit_new(session: Session, model: Model, name: str) -> Model:
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise ModelExists(name, "registered concurrently") from e
    return model


def register_import(session: Session, manifest: dict[str, Any], *, parent_model: str | None = None) -> Model:
    """Register a model written by nanochat_import.import_nanochat from its manifest (the `path`
    key is the model folder). A taken name is refused with ModelExists."""
    name = check_name(manifest["name"])
    root = Path(manifest["path"])
    sets = manifest.get("checkpoints") or []
    # One tag names the model's folders; base's when there is one (an SFT of it keeps the tag).
    tags = [c["tag"] for c in sorted(sets, key=lambda c: MODEL_PHASES.index(c["phase"]))]
    tok = manifest.get("tokenizer")
    vocab = next((c["vocab_size"] for c in sets), None)
    begin_write(session)
    if (old := get_model(session, name)) is not None:
        raise ModelExists(name, f"{old.source} model at {old.path}")
    model = Model(
        name=name,
        source="import",
        source_path=(manifest.get("source") or {}).get("path"),
        path=str(root),
        checkpoint_tag=tags[0] if tags else None,
        vocab_size=vocab if vocab is not None else (tok or {}).get("vocab_size"),
        tokenizer_path=str(root / tok["path"]) if tok else None,
        parent_model=parent_model,
        manifest=manifest,
    )
    for c in sets:
        for s in c["steps"]:
            ranks = int((c.get("optimizer_ranks") or {}).get(str(s), 0))
            model.checkpoints.append(
                ModelCheckpoint(
                    phase=_check_phase(c["phase"]),
                    step=int(s),
                    path=str(root / c["path"]),
                    has_optimizer=ranks > 0,
                    optimizer_world_size=ranks or None,
                )
            )
    session.add(model)
    return _commit_new(session, model, name)


def register_job_model(
    session: Session,
    job_id: str,
    name: str,
    path: str | Path,
    tag: str,
    vocab_size: int | None,
    tokenizer_path: str | Path | None,
    parent_model: str | None = None,
) -> Model:
    """The model job `job_id` trains, created or updated in place (idempotent: a re-run or resumed
    stage calls it again). A name held by another model is refused with ModelExists."""
    check_name(name)
    for attempt in range(2):
        begin_write(session)
        model = model_of_job(session, job_id)
        if model is None:
            if (old := get_model(session, name)) is not None:
                raise ModelExists(name, f"{old.source} model at {old.path}")
            model = Model(name=name, source="job", source_job_id=job_id, created_at=utcnow())
            session.add(model)
        model.path, model.checkpoint_tag = str(path), tag
        model.vocab_size = vocab_size
        model.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        if parent_model is not None:
            model.parent_model = parent_model
        try:
            session.commit()
            return model
        except IntegrityError:
            session.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")


def _on_disk(root: Path, tag: str | None, phases: Iterable[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """(phase, step) -> row fields of every complete checkpoint under the model's folders."""
    from shared.nanochat.checkpoint import list_checkpoints, saved_world_size

    found: dict[tuple[str, int], dict[str, Any]] = {}
    for phase in phases:
        d = root / PHASE_DIRS[phase] / tag if tag else None
        if d is None or not d.is_dir():
            continue
        for info in list_checkpoints(d):
            if info.complete:
                ws = saved_world_size(d, info.step)
                found[(phase, info.step)] = {
                    "path": str(d),
                    "has_optimizer": ws > 0,
                    "optimizer_world_size": ws or None,
                    "vocab_size": ((info.meta or {}).get("model_config") or {}).get("vocab_size"),
                }
    return found


def refresh_checkpoints(session: Session, name: str, phases: Iterable[str] = MODEL_PHASES) -> Model:
    """Make the model's checkpoint rows of `phases` match what is complete on disk: new steps are
    added, steps retention deleted are dropped, and the model's vocab_size follows the newest
    checkpoint's meta. Idempotent."""
    phases = [_check_phase(p) for p in phases]
    model = require_model(session, name)
    found = _on_disk(Path(model.path), model.checkpoint_tag, phases)
    for attempt in range(2):
        begin_write(session)
        session.expire(model)  # re-read the rows inside the write transaction
        rows = {(c.phase, c.step): c for c in model.checkpoints if c.phase in phases}
        for key, gone in rows.items():
            if key not in found:
                model.checkpoints.remove(gone)
        for (phase, step), f in sorted(found.items()):
            row = rows.get((phase, step))
            if row is None:
                row = ModelCheckpoint(phase=phase, step=step, path=f["path"])
                model.checkpoints.append(row)
            row.path = f["path"]
            row.has_optimizer, row.optimizer_world_size = f["has_optimizer"], f["optimizer_world_size"]
        newest = max(found.items(), key=lambda kv: (MODEL_PHASES.index(kv[0][0]), kv[0][1]), default=None)
        if newest is not None and isinstance(newest[1]["vocab_size"], int):
            model.vocab_size = newest[1]["vocab_size"]
        try:
            session.commit()
            return model
        except IntegrityError:  # another process added the same step meanwhile: redo on its rows
            session.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")


def newest_export(model: Model, phase: str, step: int) -> ModelExport | None:
    """The most recent recorded export of checkpoint (`phase`, `step`) of `model`, or None."""
    found = [e for e in model.exports if (e.phase, e.step) == (phase, step)]
    return max(found, key=lambda e: e.created_at) if found else None


def record_export(
    session: Session,
    name: str,
    path: str | Path,
    *,
    format: str = "hf",
    job_id: str | None = None,
    phase: str | None = None,
    step: int | None = None,
) -> ModelExport:
    """Record an export folder of model `name` (upsert by path: re-exporting replaces the folder)."""
    if phase is not None:
        _check_phase(phase)
    for attempt in range(2):
        begin_write(session)
        model = require_model(session, name)
        row = session.scalars(
            select(ModelExport).where(ModelExport.model_id == model.id, ModelExport.path == str(path))
        ).one_or_none()
        if row is None:
            row = ModelExport(model_id=model.id, path=str(path))
            session.add(row)
        row.format, row.job_id, row.phase, row.step, row.created_at = format, job_id, phase, step, utcnow()
        try:
            session.commit()
            session.expire(model, ["exports"])
            return row
        except IntegrityError:
            session.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")
