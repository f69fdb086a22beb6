"""POST /models/import: bring a model trained elsewhere into the registry, as a job.

The route is a front for an `import` job (shared/jobs/stages.py): the body is the spec's import
section ({source, path, name}), validated and submitted exactly as POST /jobs submits
{"kind": "import", "import": body} (same path checks under the data roots, same free-name check,
same Idempotency-Key handling), and the answer is that job. Errors name the body's own fields
(`path`, not `import.path`). The import itself runs on the data queue; the model shows up in
GET /models/{name} once the job has succeeded.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import error_responses
from services.api.routers.jobs import IdempotencyKey, submit_spec
from services.api.schemas import JobPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.post(
    "/import",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    summary="Import a model (an upstream nanochat base dir) as a job",
    description="Submits an `import` job for the body (components.schemas.ImportSpec: source, path "
    "under an allowed data root, model name) and answers with the job, as POST /jobs does. "
    "422 names the bad field (a path outside the data roots or missing, a bad or taken name); "
    "409 when the Idempotency-Key was used for another request.",
)
def import_model(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    body: Annotated[dict[str, Any], Body()],
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    try:
        return submit_spec(
            request, response, session, settings, {"kind": "import", "import": body}, idempotency_key
        )
    except ValidationError as e:
        # Locations inside the import section are the body's own fields here.
        errors = [
            {**err, "loc": ("body", *err["loc"][1:])} if err["loc"][:1] == ("import",) else err
            for err in e.errors()
        ]
        raise RequestValidationError(errors) from None
