"""One JSON error shape for every failure: {"error": {"code", "message", "field"?}}.

Registry refusals map to HTTP statuses here (unknown job 404, illegal transition 409), spec
validation to 422 naming the field, and an unreachable database to 503 instead of a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.schemas import ErrorBody
from shared.db.model_registry import ModelNotFound
from shared.db.registry import IdempotencyConflict, IllegalTransition, JobNotFound

log = logging.getLogger(__name__)

# Leading request-location parts that say where a value came from, not which field it is.
_LOC_PREFIXES = {"body", "query", "path", "header"}


_DESCRIPTIONS = {
    400: "The body is not JSON",
    401: "Missing or wrong bearer token",
    403: "Remote client refused: the API has no token and serves loopback clients only",
    404: "No such job, model (or file)",
    409: "The job's (or model's) state does not allow this",
    413: "The request body is too large",
    422: "Invalid input; error.field names it",
    503: "The run registry database is unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses (every error body is JSON, whatever the route's success
    media type: app.py makes sure of that in the document)."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


# The error responses every resource route can give, for the OpenAPI document.
ERROR_RESPONSES = error_responses(401, 403, 404, 422, 503)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def field_path(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in _LOC_PREFIXES:
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    """422 naming the first bad field; all problems listed under error.details."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = field_path(first.get("loc", ()))
    details = [{"field": field_path(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
    body = {
        "code": "validation_error",
        "message": f"{field or 'request'}: {first.get('msg', '')}",
        "field": field or None,
        "details": details,
    }
    return JSONResponse({"error": body}, status_code=422)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_r: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_r: Request, e: RequestValidationError) -> JSONResponse:
        return validation_response(list(e.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(_r: Request, e: ValidationError) -> JSONResponse:
        return validation_response(list(e.errors()))

    @app.exception_handler(JobNotFound)
    async def _not_found(_r: Request, e: JobNotFound) -> JSONResponse:
        return error_response(404, "job_not_found", str(e))

    @app.exception_handler(ModelNotFound)
    async def _model_not_found(_r: Request, e: ModelNotFound) -> JSONResponse:
        return error_response(404, "model_not_found", str(e))

    @app.exception_handler(IllegalTransition)
    async def _conflict(_r: Request, e: IllegalTransition) -> JSONResponse:
        return error_response(409, "illegal_transition", str(e))

    @app.exception_handler(IdempotencyConflict)
    async def _idem(_r: Request, e: IdempotencyConflict) -> JSONResponse:
        return error_response(409, "idempotency_conflict", str(e), "Idempotency-Key")

    async def _db_down(_r: Request, e: Exception) -> JSONResponse:
        # Connection-level failures only; SQL errors that mean a bug still surface as 500.
        if isinstance(e, DBAPIError) and not isinstance(e, OperationalError) and not e.connection_invalidated:
            log.exception("database error")
            return error_response(500, "database_error", "unexpected database error")
        log.warning("registry database unavailable: %s", e)
        return error_response(
            503,
            "database_unavailable",
            f"the run registry database is unavailable: {type(e).__name__}: "
            f"{str(getattr(e, 'orig', e)).strip().splitlines()[0] if str(e) else ''}",
        )

    app.add_exception_handler(OperationalError, _db_down)
    app.add_exception_handler(PoolTimeout, _db_down)
    app.add_exception_handler(DBAPIError, _db_down)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }.get(e.status_code, "http_error")
        return error_response(e.status_code, code, str(e.detail), headers=getattr(e, "headers", None))
