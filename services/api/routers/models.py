"""The model registry's models, and what the inference service serves: the published pointer file,
the live model list, and choosing the served model (publish.py, the same call the serve stage makes)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Path
from sqlalchemy.orm import Session

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError, error_responses
from services.api.schemas import (
    ModelPublic,
    ModelsPublic,
    ModelSummaryPublic,
    ServedModels,
    ServeModelRequest,
    ServeModelResult,
)
from shared.db import model_registry

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


# Declared after /served: a route's path is matched in order, so /models/served is never read as
# a model name (and the registry refuses "served" as one, model_registry.RESERVED_NAMES).
ModelName = Annotated[
    str,
    Path(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The model's name"
    ),
]


@router.get("", response_model=ModelsPublic, responses=_ERRORS, summary="Registered models")
def list_models(session: SessionDep, _auth: AuthDep) -> ModelsPublic:
    models = model_registry.list_models(session)
    return ModelsPublic(data=[ModelSummaryPublic.of(m) for m in models], count=len(models))


@router.get("/{name}", response_model=ModelPublic, responses=_ERRORS, summary="One model, with lineage")
def get_model(name: ModelName, session: SessionDep, _auth: AuthDep) -> ModelPublic:
    return ModelPublic.of(model_registry.require_model(session, name))


def _checked_ref(session: Session, name: str, body: ServeModelRequest) -> model_registry.ModelRef:
    """The checkpoint to serve, refused (409) without a checkpoint, a tokenizer or matching vocabularies."""
    from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits

    model = model_registry.require_model(session, name)
    phase = body.phase or ("sft" if model_registry.steps(model, "sft") else "base")
    try:
        ref = model_registry.resolve_checkpoint(session, name, phase, body.step)
    except model_registry.CheckpointNotFound as e:
        raise ApiError(409, "no_checkpoint", str(e), "step" if body.step is not None else "phase") from e
    if ref.tokenizer_dir is None:
        raise ApiError(
            409,
            "no_tokenizer",
            f"model {name!r} has no tokenizer (imported without one): it cannot be served",
        )
    meta_path = ref.checkpoint_dir / f"meta_{ref.step:06d}.json"
    try:
        vocab = json.loads(meta_path.read_text(encoding="utf-8"))["model_config"]["vocab_size"]
        tok = Tokenizer.load(ref.tokenizer_dir)
    except (
        Exception
    ) as e:  # unreadable meta, a tokenizer folder `tokenizers` cannot load: both the files' fault
        raise ApiError(409, "model_files_unusable", f"model {name!r}: {type(e).__name__}: {e}") from e
    try:
        check_vocab_fits(
            tok,
            int(vocab),
            tokenizer_name=f"{ref.tokenizer_dir} of model {name!r}",
            model_name=f"{name!r} ({ref.phase} step {ref.step})",
        )
    except ValueError as e:
        raise ApiError(409, "vocab_mismatch", str(e)) from e
    return ref


@router.post(
    "/{name}/serve",
    response_model=ServeModelResult,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Make this model the served one (its recorded export of the chosen checkpoint)",
)
def serve_model(
    name: ModelName,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    body: ServeModelRequest | None = None,
) -> ServeModelResult:
    from services.inference.publish import publish_model

    body = body or ServeModelRequest()
    ref = _checked_ref(session, name, body)
    model = model_registry.require_model(session, name)
    exports = [e for e in model.exports if (e.phase, e.step) == (ref.phase, ref.step)]
    if not exports:
        have = [f"{e.phase} step {e.step}" for e in model.exports]
        raise ApiError(
            409,
            "no_export",
            f"model {name!r} has no export of its {ref.phase} checkpoint at step {ref.step}"
            + (f" (exports: {', '.join(have)})" if have else " (no exports recorded)")
            + "; serving needs one: run a job with the export stage",
        )
    export = max(exports, key=lambda e: e.created_at)
    try:
        published = publish_model(settings.serving_dir, name, export.path)
    except (FileNotFoundError, ValueError) as e:
        raise ApiError(409, "export_unusable", f"model {name!r}: {e}") from e
    return ServeModelResult(
        model=name, phase=ref.phase, step=ref.step, export_dir=export.path, published=published
    )
