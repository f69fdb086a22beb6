"""The model registry's models, and what the inference service serves: the published pointer file,
the live model list, and choosing the served model (publish.py, the same call the serve stage makes;
a checkpoint not exported yet is exported and served by a job submitted as POST /jobs submits)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError, error_responses
from services.api.routers.jobs import IdempotencyKey, submit_spec
from services.api.schemas import (
    ModelPublic,
    ModelsPublic,
    ModelSummaryPublic,
    ServedModels,
    ServeModelQueued,
    ServeModelRequest,
    ServeModelResult,
)
from shared.db import model_registry
from shared.settings import Settings

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
    from shared.jobs.init_model import check_tokenizer_fits
    from shared.nanochat.tokenizer import TokenizerMismatch

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
    try:
        check_tokenizer_fits(ref)
    except TokenizerMismatch as e:
        raise ApiError(409, "vocab_mismatch", str(e)) from e
    except Exception as e:  # unreadable meta or tokenizer folder: the files' fault, not the request's
        raise ApiError(409, "model_files_unusable", f"model {name!r}: {type(e).__name__}: {e}") from e
    return ref


# The phases a job can export: the platform trains and exports base and sft checkpoints; an
# imported model's rl checkpoints are served only through an export made elsewhere.
EXPORTABLE_PHASES = ("base", "sft")


@router.post(
    "/{name}/serve",
    response_model=ServeModelResult,
    responses={
        200: {"description": "The checkpoint had a recorded export: it is published and served now"},
        202: {
            "model": ServeModelQueued,
            "description": "The checkpoint had no recorded export: a job (stages export, serve) was "
            "submitted that exports it, records the export under the model and publishes it under "
            "the model's name; follow `job` at /jobs/{id}",
        },
        **error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    },
    summary="Make this model the served one (exporting the chosen checkpoint first when needed)",
    description="Resolves the checkpoint (`phase`, `step`; default the newest sft, else base) and "
    "refuses (409) a model without it, without a tokenizer, or whose tokenizer does not fit it. "
    "With a recorded export of that checkpoint the answer is 200 and the export is published at "
    "once; without one it is 202 with the job that exports and serves it, submitted as POST /jobs "
    "submits `{kind: pipeline, init: {model, phase, step}, stages: [export, serve]}` (an "
    "Idempotency-Key header returns the same job for a repeated request).",
)
def serve_model(
    name: ModelName,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    body: ServeModelRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> ServeModelResult | JSONResponse:
    from services.inference.publish import publish_model

    body = body or ServeModelRequest()
    ref = _checked_ref(session, name, body)
    model = model_registry.require_model(session, name)
    export = model_registry.newest_export(model, ref.phase, ref.step)
    if export is None:
        return _export_then_serve(request, response, session, settings, ref, idempotency_key)
    try:
        published = publish_model(settings.serving_dir, name, export.path)
    except (FileNotFoundError, ValueError) as e:
        raise ApiError(409, "export_unusable", f"model {name!r}: {e}") from e
    return ServeModelResult(
        model=name, phase=ref.phase, step=ref.step, export_dir=export.path, published=published
    )


def _export_then_serve(
    request: Request,
    response: Response,
    session: Session,
    settings: Settings,
    ref: model_registry.ModelRef,
    idempotency_key: str | None,
) -> JSONResponse:
    """202 with the job that exports checkpoint `ref` and publishes it under the model's name,
    submitted through the POST /jobs path (same validation, registry row, enqueue)."""
    if ref.phase not in EXPORTABLE_PHASES:
        raise ApiError(
            409,
            "no_export",
            f"model {ref.name!r} has no export of its {ref.phase} checkpoint at step {ref.step}, and a "
            f"job exports only {' or '.join(EXPORTABLE_PHASES)} checkpoints: export it elsewhere or "
            "serve another phase",
            "phase",
        )
    spec = {
        "kind": "pipeline",
        "name": f"serve {ref.name}",
        # The resolved step, not "latest": the job exports what this request chose even if a newer
        # checkpoint lands before it runs.
        "init": {"model": ref.name, "phase": ref.phase, "step": ref.step},
        "stages": ["export", "serve"],
        # It trains nothing: no batch size to check against the model's sequence length.
        "batch": {"total_batch_size": None},
    }
    job = submit_spec(request, response, session, settings, spec, idempotency_key)
    queued = ServeModelQueued(model=ref.name, phase=ref.phase, step=ref.step, job=job)
    return JSONResponse(
        queued.model_dump(mode="json"), status_code=202, headers={"Location": f"/jobs/{job.id}"}
    )
