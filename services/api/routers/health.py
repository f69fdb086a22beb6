"""Liveness (the process answers) and readiness (registry and broker reachable)."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import inspect, text

router = APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 5.0


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def check_database(request: Request) -> str | None:
    """None when the registry answers and is migrated, else what is wrong."""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            if not inspect(conn).has_table("jobs"):
                return "registry tables missing: run `ncp db upgrade`"
    except Exception as e:  # any failure to reach it is the answer, not a crash
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def check_broker(broker_url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=READY_TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=1, timeout=READY_TIMEOUT_SECONDS)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


@router.get(
    "/readyz",
    summary="Readiness: registry database and message broker reachable",
    responses={503: {"description": "A dependency is down; the body says which"}},
)
async def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    db_err = await to_thread.run_sync(check_database, request)
    broker_err = await to_thread.run_sync(check_broker, settings.broker_url)
    checks: dict[str, Any] = {"database": db_err or "ok", "broker": broker_err or "ok"}
    if db_err or broker_err:
        first = "database" if db_err else "broker"
        body = {
            "error": {"code": f"{first}_unavailable", "message": f"{first}: {db_err or broker_err}"},
            "checks": checks,
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})
