"""What a job produced and reported: events (paged or live SSE), metrics, checkpoints, eval results,
artifacts, log tails and the Markdown report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette.sse import EventSourceResponse

from services.api import metrics_series
from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError
from services.api.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    CheckpointPublic,
    CheckpointsPublic,
    EvalResultPublic,
    EvalResultsPublic,
    EventPublic,
    EventsPublic,
    LogsPublic,
    MetricPoint,
    MetricsPublic,
)
from shared.db import registry
from shared.db.session import session_scope
from shared.paths import PathEscapeError, run_paths, safe_join

router = APIRouter(prefix="/jobs/{job_id}", tags=["job data"])

MAX_LOG_BYTES = 4 * 1024 * 1024  # never read more than this from the end of one log file


# --- events --------------------------------------------------------------------------------------
def _poll_events(sessions: sessionmaker[Session], job_id: str, after: int) -> tuple[list[EventPublic], bool]:
    # A short session per poll: a live stream must not hold a transaction (or a SQLite lock) open.
    # Status first, events second: the event announcing the final status commits together with
    # it, so a poll that sees a finished job also sees that event.
    with session_scope(sessions) as s:
        terminal = registry.get_job(s, job_id).is_terminal
        events = [EventPublic.of(e) for e in registry.list_events(s, job_id, after_seq=after, limit=500)]
    return events, terminal


async def _event_stream(request: Request, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
    sessions = request.app.state.session_factory
    interval: float = request.app.state.sse_poll_seconds
    while True:
        try:
            events, terminal = await to_thread.run_sync(_poll_events, sessions, job_id, after)
        except Exception as e:  # registry gone mid-stream: tell the client, end the stream cleanly
            yield {
                "event": "error",
                "data": json.dumps(
                    {"code": "database_unavailable", "message": f"{type(e).__name__}: {e}"[:500]}
                ),
            }
            return
        for ev in events:
            after = ev.seq
            yield {"id": str(ev.seq), "event": ev.type, "data": ev.model_dump_json()}
        # Every event written up to the job's end was read by this poll (see _poll_events).
        if terminal and not events:
            yield {"event": "end", "data": json.dumps({"job_id": job_id})}
            return
        if await request.is_disconnected():
            return
        if not events:
            await asyncio.sleep(interval)


@router.get(
    "/events",
    response_model=EventsPublic,
    responses={
        **_ERRORS,
        200: {
            "description": "JSON page of events, or with `Accept: text/event-stream` a live SSE stream "
            "(id = event seq, event = type) that ends with an `end` event once the job has finished.",
            "content": {"text/event-stream": {}},
        },
    },
    summary="Job events (paged JSON or live SSE)",
)
def job_events(
    request: Request,
    job_id: str,
    session: SessionDep,
    _auth: AuthDep,
    after: Annotated[int, Query(ge=0, description="Return events with seq > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    registry.get_job(session, job_id)  # 404 before any streaming starts
    if accept and "text/event-stream" in accept:
        start = after
        if last_event_id and last_event_id.isdigit():  # a reconnecting EventSource resumes here
            start = max(start, int(last_event_id))
        session.close()  # the stream polls with its own short sessions; hold no transaction open
        return EventSourceResponse(_event_stream(request, job_id, start), ping=15)
    events = [EventPublic.of(e) for e in registry.list_events(session, job_id, after_seq=after, limit=limit)]
    return EventsPublic(data=events, count=len(events), next_after=events[-1].seq if events else after)


# --- metrics, checkpoints, evals, artifacts ------------------------------------------------------
@router.get(
    "/metrics",
    response_model=MetricsPublic,
    responses={
        **_ERRORS,
        200: {
            "description": "The whole run's series: paged raw rows (default) or, with ?points=N, each "
            "series downsampled on the server. With `Accept: text/event-stream`, a live SSE stream of "
            "rows recorded after ?after_id= (event `metrics`, id = newest row id), ending with `end` "
            "once the job has finished.",
            "content": {"text/event-stream": {}},
        },
    },
    summary="Metric time series (paged, downsampled or live)",
)
def job_metrics(
    request: Request,
    job_id: str,
    session: SessionDep,
    _auth: AuthDep,
    name: Annotated[list[str] | None, Query(description="Only these series (repeatable)")] = None,
    stage: Annotated[str | None, Query()] = None,
    after_step: Annotated[int | None, Query(ge=-1)] = None,
    points: Annotated[
        int | None,
        Query(
            ge=metrics_series.MIN_POINTS,
            le=metrics_series.MAX_POINTS,
            description="Downsample every stage/series to at most this many points (min/max per bucket)",
        ),
    ] = None,
    cursor: Annotated[str | None, Query(description="paged: next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=metrics_series.MAX_PAGE_ROWS)] = metrics_series.MAX_PAGE_ROWS,
    after_id: Annotated[int, Query(ge=0, description="live stream: rows after this row id")] = 0,
    accept: Annotated[str | None, Header()] = None,
) -> Any:
    registry.get_job(session, job_id)
    flt = metrics_series.MetricFilter(job_id, tuple(name) if name else None, stage, after_step)
    if accept and "text/event-stream" in accept:
        session.close()  # the stream polls with its own short sessions
        return EventSourceResponse(_metrics_stream(request, flt, after_id), ping=15)
    if points is not None and cursor is not None:
        raise ApiError(
            422, "validation_error", "give either points (downsampled) or cursor (paged)", "cursor"
        )
    sizes = metrics_series.series_sizes(session, flt)
    rows = metrics_series.row_counts(sizes)
    if points is not None:
        kept, last_id = metrics_series.downsample(session, flt, points, sizes)
        return MetricsPublic(
            job_id=job_id, mode="downsampled", series=_points(kept), rows=rows, points=points, last_id=last_id
        )
    try:
        page, next_cursor = metrics_series.read_page(session, flt, cursor, limit)
    except metrics_series.CursorError as e:
        raise ApiError(422, "validation_error", str(e), "cursor") from None
    return MetricsPublic(
        job_id=job_id, mode="paged", series=_points(page), rows=rows, next_cursor=next_cursor
    )


def _points(rows: list[metrics_series.Row]) -> dict[str, list[MetricPoint]]:
    return {
        name: [MetricPoint(step=r.step, value=r.value, stage=r.stage, ts=r.ts) for r in group]
        for name, group in metrics_series.group_by_name(rows).items()
    }


def _poll_metrics(
    sessions: sessionmaker[Session], flt: metrics_series.MetricFilter, after_id: int
) -> tuple[list[metrics_series.Row], bool]:
    # Status before rows, as in _poll_events: a poll that sees the job finished saw its last rows.
    with session_scope(sessions) as s:
        terminal = registry.get_job(s, flt.job_id).is_terminal
        rows = metrics_series.rows_after(s, flt, after_id)
    return rows, terminal


async def _metrics_stream(
    request: Request, flt: metrics_series.MetricFilter, after_id: int
) -> AsyncIterator[dict[str, Any]]:
    sessions = request.app.state.session_factory
    interval: float = request.app.state.sse_poll_seconds
    last_event_id = request.headers.get("last-event-id", "")
    if last_event_id.isdigit():  # a reconnecting client resumes after the last rows it got
        after_id = max(after_id, int(last_event_id))
    while True:
        try:
            rows, terminal = await to_thread.run_sync(_poll_metrics, sessions, flt, after_id)
        except Exception as e:  # registry gone mid-stream: say so and end cleanly
            yield {
                "event": "error",
                "data": json.dumps(
                    {"code": "database_unavailable", "message": f"{type(e).__name__}: {e}"[:500]}
                ),
            }
            return
        if rows:
            after_id = rows[-1].id
            points = [{"stage": r.stage, "name": r.name, "step": r.step, "value": r.value} for r in rows]
            yield {"id": str(after_id), "event": "metrics", "data": json.dumps({"points": points})}
            continue
        if terminal:
            yield {"event": "end", "data": json.dumps({"job_id": flt.job_id})}
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(interval)


@router.get("/checkpoints", response_model=CheckpointsPublic, responses=_ERRORS, summary="Checkpoints")
def job_checkpoints(
    job_id: str, session: SessionDep, _auth: AuthDep, kind: Annotated[str | None, Query()] = None
) -> CheckpointsPublic:
    registry.get_job(session, job_id)
    rows = [CheckpointPublic.of(c) for c in registry.list_checkpoints(session, job_id, kind=kind)]
    return CheckpointsPublic(data=rows, count=len(rows))


@router.get("/evals", response_model=EvalResultsPublic, responses=_ERRORS, summary="Evaluation results")
def job_evals(
    job_id: str, session: SessionDep, _auth: AuthDep, stage: Annotated[str | None, Query()] = None
) -> EvalResultsPublic:
    registry.get_job(session, job_id)
    rows = [
        EvalResultPublic(
            stage=r.stage, checkpoint_step=r.checkpoint_step, task=r.task, metric=r.metric, value=r.value
        )
        for r in registry.list_eval_results(session, job_id, stage=stage)
    ]
    return EvalResultsPublic(data=rows, count=len(rows))


@router.get(
    "/artifacts", response_model=ArtifactsPublic, responses=_ERRORS, summary="Named outputs of the job"
)
def job_artifacts(job_id: str, session: SessionDep, _auth: AuthDep) -> ArtifactsPublic:
    registry.get_job(session, job_id)
    arts = [
        ArtifactPublic(name=a.name, path=a.path, kind=a.kind, created_at=a.created_at)
        for a in registry.list_artifacts(session, job_id)
    ]
    return ArtifactsPublic(data=arts, count=len(arts))


# --- files under the run folder ------------------------------------------------------------------
def tail_lines(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file, reading at most MAX_LOG_BYTES from its end."""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        start = max(0, size - MAX_LOG_BYTES)
        block = 64 * 1024
        pos, data = size, b""
        while pos > start and data.count(b"\n") <= lines:
            step = min(block, pos - start)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


@router.get("/logs", response_model=LogsPublic, responses=_ERRORS, summary="Tail of the job's log files")
def job_logs(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    lines: Annotated[int, Query(ge=1, le=10_000)] = 200,
    file: Annotated[str | None, Query(description="One log file name, e.g. train.log")] = None,
) -> LogsPublic:
    registry.get_job(session, job_id)
    logs_dir = run_paths(settings.runs_dir, job_id).logs
    if file is not None:
        if not file.endswith(".log"):
            raise ApiError(422, "validation_error", "file must name a .log file", "file")
        try:
            paths = [safe_join(logs_dir, file)]
        except PathEscapeError as e:
            raise ApiError(422, "validation_error", str(e), "file") from None
        if not paths[0].is_file():
            raise ApiError(404, "not_found", f"no log file {file!r} for job {job_id}", "file")
    else:
        paths = sorted(logs_dir.glob("*.log")) if logs_dir.is_dir() else []
    return LogsPublic(job_id=job_id, logs={p.name: tail_lines(p, lines) for p in paths})


@router.get(
    "/report",
    responses={**_ERRORS, 200: {"content": {"text/markdown": {}}}},
    response_class=PlainTextResponse,
    summary="The run's Markdown report",
)
def job_report(job_id: str, session: SessionDep, settings: SettingsDep, _auth: AuthDep) -> PlainTextResponse:
    registry.get_job(session, job_id)
    report = run_paths(settings.runs_dir, job_id).report / "report.md"
    if not report.is_file():
        raise ApiError(404, "report_not_ready", f"job {job_id} has no report yet")
    return PlainTextResponse(report.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")


@router.get(
    "/report/{name}",
    responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
    summary="A file of the report, e.g. the loss plot (loss.png)",
)
def job_report_file(
    name: str, job_id: str, session: SessionDep, settings: SettingsDep, _auth: AuthDep
) -> FileResponse:
    registry.get_job(session, job_id)
    try:
        path = safe_join(run_paths(settings.runs_dir, job_id).report, name)
    except PathEscapeError as e:
        raise ApiError(422, "validation_error", str(e), "name") from None
    if not path.is_file():
        raise ApiError(404, "not_found", f"job {job_id} has no report file {name!r}", "name")
    return FileResponse(path)
