"""The job API: `uvicorn services.api.app:create_app --factory`.

create_app wires settings, the registry engine, error handlers, auth, metrics and one router per
resource. It never creates tables (run `ncp db upgrade` first) and, without NCP_API_TOKEN, it
only serves loopback clients unless NCP_API_ALLOW_REMOTE_WITHOUT_TOKEN says otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from services.api import console, errors, observability
from services.api.limits import RequestLimits
from services.api.routers import health, job_data, jobs, log_follow, model_import, models, plan
from shared.db.session import make_engine, make_session_factory
from shared.jobs.spec import JobSpec
from shared.loopback import is_loopback, remote_connection
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Paths a load balancer / Prometheus may reach without a token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class InsecureBindError(RuntimeError):
    pass


def check_bind(settings: Settings, host: str | None = None) -> None:
    """Refuse a non-loopback bind without a token unless explicitly allowed."""
    host = host or settings.api_host
    if settings.api_token is None and not settings.api_allow_remote_without_token and not is_loopback(host):
        raise InsecureBindError(
            f"refusing to serve on {host} without NCP_API_TOKEN: set a token, bind to 127.0.0.1, or set "
            "NCP_API_ALLOW_REMOTE_WITHOUT_TOKEN=true on a trusted network"
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    # POST /jobs and POST /models/import validate their bodies by hand (with the configured data
    # roots as context), so the JobSpec schema (ImportSpec among its parts) is added here.
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update(spec_schema.pop("$defs", {}))
    comps["JobSpec"] = spec_schema
    for path, body in (("/jobs", "JobSpec"), ("/models/import", "ImportSpec")):
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    # Every error is the JSON error body, also on routes whose success is Markdown, PNG or text
    # (FastAPI would document their errors in the success media type).
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in schema["paths"].values():
        for op in operations.values():
            for status, response in op.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400 and "ErrorBody" in json.dumps(response):
                    response["content"] = error_body
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_bind(settings)
    assert settings.database_url is not None
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="nanochat platform API",
        version="0.1.0",
        description="Submit and follow nanochat pipeline jobs (data, tokenizer, pretraining, evaluation, "
        'SFT, export, serving). Errors are JSON: {"error": {"code", "message", "field"?}}.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = sessions
    app.state.sse_poll_seconds = 0.5

    errors.install(app)
    app.add_middleware(RequestLimits)
    observability.install(app, sessions)
    for r in (
        jobs.router, job_data.router, log_follow.router, models.router, model_import.router, plan.router,
        health.router,
    ):  # fmt: skip
        app.include_router(r)
    console.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    remote_ok = settings.api_token is not None or settings.api_allow_remote_without_token

    @app.middleware("http")
    async def _loopback_only(request: Request, call_next: Any) -> Response:
        # The bind address is chosen on uvicorn's command line, out of our sight; the address a
        # request arrived on is not. Without a token, only loopback connections are served.
        if not remote_ok and request.url.path not in PUBLIC_PATHS:
            server = request.scope.get("server")
            client = request.scope.get("client")
            if remote_connection(server[0] if server else None, client[0] if client else None):
                return errors.error_response(
                    403,
                    "remote_access_disabled",
                    "this API has no NCP_API_TOKEN and only serves loopback clients; set a token to allow "
                    "remote access",
                )
        return await call_next(request)

    return app


def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn after the bind check (what `python -m services.api.app` does)."""
    import uvicorn

    settings = get_settings()
    host = host or settings.api_host
    check_bind(settings, host)
    uvicorn.run(
        create_app(settings), host=host, port=port or settings.api_port, log_level=settings.log_level.lower()
    )


if __name__ == "__main__":
    serve()
