"""FastAPI dependencies: the registry session, settings and bearer-token auth (Annotated aliases)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from services.api.errors import ApiError
from shared.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        session.close()


def require_auth(request: Request) -> None:
    """Bearer token check when Settings.api_token is set (constant-time comparison)."""
    token: str | None = request.app.state.settings.api_token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token (Authorization: Bearer <NCP_API_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


# Job ids are UUIDs; anything else (over-long, NUL, slashes) is refused before the registry sees it.
JobId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$", description="The job's id")
]

SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
AuthDep = Annotated[None, Depends(require_auth)]
