"""Request limits checked before any route runs: body size, and no NUL byte in the URL.

- A body larger than `max_body_bytes` is refused with 413 before it is parsed, whether it says
  its size (Content-Length) or streams it (chunked): a 30 MB JSON spec is never built in memory.
- A NUL byte anywhere in the path or the query string (percent-encoded or not) is refused with
  422: PostgreSQL text cannot hold one, and no identifier, filter or file name the API takes
  contains one.

An ASGI middleware rather than an HTTP one, so the body is counted as it arrives.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1 << 20  # a job spec is a few KB; 1 MiB leaves room for long names and lists


class BodyTooLarge(HTTPException):
    """Raised from inside the body stream; an HTTPException so that FastAPI's body parsing passes
    it on (it turns any other error while reading into a 400) and the API's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


async def _send_error(send: Send, status: int, code: str, message: str, field: str | None = None) -> None:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope.get("path", "").encode()
        query = scope.get("query_string", b"")
        for where, raw in (("path", raw_path), ("query", query)):
            if b"\x00" in raw or b"\x00" in unquote_to_bytes(raw.replace(b"+", b" ")):
                await _send_error(
                    send, 422, "validation_error", f"the request {where} contains a NUL byte", where
                )
                return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, 413, "request_too_large", BodyTooLarge(self.max_body_bytes).detail)
            return

        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as e:
            if not started:
                await _send_error(send, 413, "request_too_large", e.detail)
