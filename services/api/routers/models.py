"""What the inference service serves: the published pointer file and the live model list."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import APIRouter

from services.api.deps import AuthDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.schemas import ServedModels

router = APIRouter(prefix="/models", tags=["models"])


@router.get("/served", response_model=ServedModels, responses=_ERRORS, summary="Models being served")
async def served_models(settings: SettingsDep, _auth: AuthDep) -> ServedModels:
    current: dict[str, Any] | None = None
    pointer = settings.serving_dir / "current.json"
    if pointer.is_file():
        try:
            current = json.loads(pointer.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            current = {"error": f"unreadable {pointer.name}: {e}"}
    url = f"{settings.inference_url}/v1/models"
    try:
        async with httpx.AsyncClient(timeout=3.0, headers=settings.inference_headers) as client:
            r = await client.get(url)
        r.raise_for_status()
        live: dict[str, Any] = {"reachable": True, "url": url, "models": r.json().get("data", [])}
    except (httpx.HTTPError, ValueError) as e:
        live = {"reachable": False, "url": url, "error": f"{type(e).__name__}: {e}"}
    return ServedModels(current=current, live=live)
