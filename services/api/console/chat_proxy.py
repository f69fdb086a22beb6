"""`/v1/models` and `/v1/chat/completions` on the API's origin, relayed to the inference service.

The console's chat page (and `ncp chat`) talk to the served model through the API: one origin for
the browser (no CORS, the model server stays off the network), one bearer token for everything.
Requests go through unchanged and responses come back as they arrive, so a streamed answer
(`"stream": true`, server-sent events) streams to the browser token by token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from services.api.deps import AuthDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError

router = APIRouter(prefix="/v1", tags=["models"])

MAX_BODY_BYTES = 1024 * 1024  # a chat request is messages and a few numbers
CONNECT_TIMEOUT = 5.0


def _unreachable(url: str, e: Exception) -> ApiError:
    return ApiError(
        503,
        "inference_unavailable",
        f"the model server at {url} is unreachable ({type(e).__name__}); is a model served? (GET /models/served)",
    )


@router.get("/models", responses=_ERRORS, summary="Models the inference service serves (relayed)")
async def models(settings: SettingsDep, _auth: AuthDep) -> Response:
    url = f"{settings.inference_url}/v1/models"
    try:
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT, headers=settings.inference_headers) as client:
            r = await client.get(url)
    except httpx.HTTPError as e:
        raise _unreachable(url, e) from None
    return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))


@router.post(
    "/chat/completions",
    responses=_ERRORS,
    summary="OpenAI-compatible chat completion from the served model (relayed, streams)",
)
async def chat_completions(request: Request, settings: SettingsDep, _auth: AuthDep) -> Response:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "request_too_large", f"a chat request may be at most {MAX_BODY_BYTES} bytes")
    url = f"{settings.inference_url}/v1/chat/completions"
    # No read timeout: a long answer streams for as long as it takes; connecting is quick or fails.
    client = httpx.AsyncClient(timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None))
    try:
        upstream = await client.send(
            client.build_request(
                "POST",
                url,
                content=body,
                headers={"Content-Type": "application/json", **settings.inference_headers},
            ),
            stream=True,
        )
    except httpx.HTTPError as e:
        await client.aclose()
        raise _unreachable(url, e) from None

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
            await client.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        relay(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
        headers=headers,
    )
