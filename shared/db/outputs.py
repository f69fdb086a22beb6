"""What a job produces: metric time series, checkpoints, named artifacts and eval results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.errors import JobNotFound
from shared.db.events import append_event
from shared.db.models import CHECKPOINT_KINDS, Artifact, Checkpoint, EvalResult, Job, Metric, utcnow
from shared.db.session import begin_write


def _raise_unless_race(session: Session, job_id: str, error: Exception, attempt: int) -> None:
    """After a failed upsert: a missing job is JobNotFound; a concurrent insert of the same row
    (unique constraint) is retried once by the caller, which then finds and updates that row."""
    if session.get(Job, job_id, populate_existing=True) is None:
        raise JobNotFound(job_id) from error
    if attempt > 0 or isinstance(error, JobNotFound):
        raise error


def add_metrics(
    session: Session, job_id: str, stage: str, step: int, values: Mapping[str, float | int | None]
) -> int:
    """Record one step's scalars (None and non-numbers are skipped); returns rows written."""
    now = utcnow()
    rows = [
        Metric(job_id=job_id, stage=stage, step=int(step), name=name, value=float(v), ts=now)
        for name, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if not rows:
        return 0
    begin_write(session)
    session.add_all(rows)
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise JobNotFound(job_id) from e
    return len(rows)


def get_metrics(
    session: Session,
    job_id: str,
    *,
    names: Iterable[str] | None = None,
    stage: str | None = None,
    after_step: int | None = None,
    limit: int = 10_000,
) -> list[Metric]:
    q = select(Metric).where(Metric.job_id == job_id)
    if names is not None:
        q = q.where(Metric.name.in_(list(names)))
    if stage is not None:
        q = q.where(Metric.stage == stage)
    if after_step is not None:
        q = q.where(Metric.step > after_step)
    return list(session.scalars(q.order_by(Metric.step, Metric.id).limit(limit)))


def record_checkpoint(
    session: Session,
    job_id: str,
    stage: str,
    step: int,
    path: str,
    kind: str = "base",
    val_bpb: float | None = None,
    files: list[Any] | None = None,
) -> Checkpoint:
    """Register a complete checkpoint (idempotent per job/kind/step: a re-save updates the row)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {CHECKPOINT_KINDS}")
    for attempt in range(2):
        begin_write(session)
        ckpt = session.scalars(
            select(Checkpoint).where(
                Checkpoint.job_id == job_id, Checkpoint.kind == kind, Checkpoint.step == step
            )
        ).one_or_none()
        if ckpt is None:
            ckpt = Checkpoint(job_id=job_id, stage=stage, step=step, kind=kind, path=str(path))
            session.add(ckpt)
        ckpt.path, ckpt.stage, ckpt.created_at = str(path), stage, utcnow()
        if val_bpb is not None:
            ckpt.val_bpb = float(val_bpb)
        if files is not None:
            ckpt.files = list(files)
        try:
            append_event(
                session,
                job_id,
                "checkpoint",
                f"{kind} checkpoint at step {step}",
                stage=stage,
                data={"step": step, "path": str(path), "val_bpb": val_bpb},
            )
            session.commit()
            return ckpt
        except (IntegrityError, JobNotFound) as e:
            session.rollback()
            _raise_unless_race(session, job_id, e, attempt)
    raise AssertionError("unreachable")


def remove_checkpoints(session: Session, job_id: str, kind: str, steps: Iterable[int], why: str) -> int:
    """Drop the rows of checkpoints that no longer exist (retention deleted them); returns how many."""
    gone = sorted(set(steps))
    if not gone:
        return 0
    begin_write(session)
    result = session.execute(
        delete(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.kind == kind, Checkpoint.step.in_(gone)
        )
    )
    n = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if n:
        append_event(
            session, job_id, "checkpoint_removed", f"{kind} checkpoint(s) {gone} removed: {why}",
            data={"kind": kind, "steps": gone},
        )  # fmt: skip
    session.commit()
    return n


def list_checkpoints(session: Session, job_id: str, kind: str | None = None) -> list[Checkpoint]:
    q = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if kind is not None:
        q = q.where(Checkpoint.kind == kind)
    return list(session.scalars(q.order_by(Checkpoint.created_at, Checkpoint.step)))


def latest_checkpoint(session: Session, job_id: str, kind: str | None = None) -> Checkpoint | None:
    q = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if kind is not None:
        q = q.where(Checkpoint.kind == kind)
    return session.scalars(q.order_by(Checkpoint.created_at.desc(), Checkpoint.step.desc()).limit(1)).first()


def latest_checkpoints(session: Session, job_ids: Iterable[str]) -> dict[str, Checkpoint]:
    """The newest checkpoint of each job that has one, in one query (for job listings)."""
    ids = list(job_ids)
    if not ids:
        return {}
    newest = (
        select(Checkpoint.job_id, func.max(Checkpoint.created_at).label("at"))
        .where(Checkpoint.job_id.in_(ids))
        .group_by(Checkpoint.job_id)
        .subquery()
    )
    rows = session.scalars(
        select(Checkpoint)
        .join(newest, (Checkpoint.job_id == newest.c.job_id) & (Checkpoint.created_at == newest.c.at))
        .order_by(Checkpoint.step)
    )
    return {c.job_id: c for c in rows}  # equal timestamps: the higher step wins (ordered last)


def record_artifact(session: Session, job_id: str, name: str, path: str, kind: str) -> Artifact:
    """Register a named output of a job (upsert by name)."""
    for attempt in range(2):
        begin_write(session)
        art = session.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
        ).one_or_none()
        if art is None:
            art = Artifact(job_id=job_id, name=name, path=str(path), kind=kind)
            session.add(art)
        art.path, art.kind, art.created_at = str(path), kind, utcnow()
        try:
            session.commit()
            return art
        except IntegrityError as e:
            session.rollback()
            _raise_unless_race(session, job_id, e, attempt)
    raise AssertionError("unreachable")


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def record_eval_results(
    session: Session,
    job_id: str,
    stage: str,
    checkpoint_step: int | None,
    results: Mapping[str, Mapping[str, float | int | None] | float | int | None],
) -> int:
    """Store eval numbers as rows: `{task: {metric: value}}`, or `{task: value}` (metric "value").
    A repeated evaluation of the same checkpoint replaces its earlier rows; returns rows written."""
    rows: list[EvalResult] = []
    for task, metrics in results.items():
        items = metrics.items() if isinstance(metrics, Mapping) else [("value", metrics)]
        for metric, value in items:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append(
                    EvalResult(
                        job_id=job_id,
                        stage=stage,
                        checkpoint_step=checkpoint_step,
                        task=str(task),
                        metric=str(metric),
                        value=float(value),
                    )
                )
    begin_write(session)
    step_match = (
        EvalResult.checkpoint_step.is_(None)
        if checkpoint_step is None
        else EvalResult.checkpoint_step == checkpoint_step
    )
    session.execute(
        delete(EvalResult).where(EvalResult.job_id == job_id, EvalResult.stage == stage, step_match)
    )
    session.add_all(rows)
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise JobNotFound(job_id) from e
    return len(rows)


def list_eval_results(session: Session, job_id: str, stage: str | None = None) -> list[EvalResult]:
    q = select(EvalResult).where(EvalResult.job_id == job_id)
    if stage is not None:
        q = q.where(EvalResult.stage == stage)
    return list(session.scalars(q.order_by(EvalResult.stage, EvalResult.task, EvalResult.metric)))
