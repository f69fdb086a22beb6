"""The native OpenAI-compatible server (fallback when vLLM is unavailable).

Surface: GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed
as SSE or not; temperature, top_p, top_k, max_tokens, stop, n, seed; usage counts). Errors use
OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}. Generation runs on the
continuous batcher (batcher.py), so concurrent requests share decode steps.

Access, as vLLM's `--api-key` and like the job API: with a key (NCP_INFERENCE_API_KEY) every /v1
request must carry `Authorization: Bearer <key>`; without one, only loopback clients are served.
/health is open either way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.inference.native.batcher import Batcher, GenerationRequest, SamplingParams
from shared.loopback import remote_connection
from shared.nanochat.tokenizer import prompt_ids


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=32)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[int]


def _text_content(content: str | list[dict[str, Any]], i: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


class _Choice:
    """Detokenizes one choice incrementally and applies stop strings."""

    def __init__(self, tok, stop_ids: set[int], stop: list[str]):
        self.tok, self.stop_ids, self.stop = tok, stop_ids, stop
        # Like vLLM's default skip_special_tokens=True: tool-call markers and other specials are
        # generated (and counted) but never appear in the returned text.
        self.hidden_ids = set(tok.special_ids.values())
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None
        self.n_tokens = 0

    def add(self, token: int) -> str:
        """Returns the newly releasable text; sets finish='stop' on a stop string."""
        self.n_tokens += 1
        if token in self.stop_ids:
            return self.flush()
        if token in self.hidden_ids:
            return ""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.finish = "stop"
                return self._release(text[:at])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte(s)
            return ""
        hold = max((len(s) - 1 for s in self.stop if s), default=0)  # could be a stop string's start
        return self._release(text[: len(text) - hold] if hold else text)

    def flush(self) -> str:
        # Like vLLM's detokenizer (tokenizers' DecodeStream): text ending in a replacement
        # character is held back as a possibly unfinished character, and whatever is still held
        # when generation ends is dropped, so both engines return the same text.
        k, text = len(self.ids), self.tok.decode(self.ids)
        while k > 0 and text.endswith("\ufffd"):
            k -= 1
            text = self.tok.decode(self.ids[:k])
        return self._release(text)

    def _release(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


def _access_denied(request: Request, api_key: str | None) -> JSONResponse | None:
    if not request.url.path.startswith("/v1"):
        return None
    if api_key is None:
        server, client = request.scope.get("server"), request.scope.get("client")
        if remote_connection(server[0] if server else None, client[0] if client else None):
            return JSONResponse(
                error_body(
                    "this model server has no API key (NCP_INFERENCE_API_KEY) and serves loopback clients only",
                    "invalid_request_error",
                    code="remote_access_disabled",
                ),
                status_code=403,
            )
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode()):
        return None
    return JSONResponse(
        error_body("missing or invalid API key (Authorization: Bearer <key>)", "invalid_request_error",
                   code="invalid_api_key"),
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


def create_app(
    model, tokenizer, served_name: str, *, max_batch: int = 16, api_key: str | None = None
) -> FastAPI:
    batcher = Batcher(model, tokenizer, max_batch=max_batch)
    max_len = model.config.sequence_len
    created = int(time.time())
    stop_ids = set(batcher.stops)

    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="nanochat native server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def _access(request: Request, call_next):
        return _access_denied(request, api_key) or await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}" for er in errs
        )
        return JSONResponse(
            error_body(msg or "invalid request", "invalid_request_error", ".".join(loc) or None), 400
        )

    @app.get("/health")
    async def health():
        if not batcher._thread.is_alive():
            raise APIError(503, "the generation thread is not running", type_="server_error")
        return {"status": "ok", "model": served_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": served_name, "object": "model", "created": created, "owned_by": "ncp", "max_model_len": max_len}
        ]}  # fmt: skip

    def _check(req: _Common) -> None:
        if req.model != served_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", type_="NotFoundError",
                           param="model", code="model_not_found")  # fmt: skip

    def _params(req: _Common, n_prompt: int, max_tokens: int | None) -> SamplingParams:
        if n_prompt >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, your prompt "
                           f"has {n_prompt} tokens, leaving no room for a completion.", param="messages",
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = max_len - n_prompt
        elif n_prompt + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        if req.n > batcher.max_batch:
            raise APIError(400, f"n={req.n} exceeds this server's batch size {batcher.max_batch}", param="n")
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        return SamplingParams(max_tokens, req.temperature, top_k, req.top_p, req.seed, req.n)

    async def _run(
        prompt: list[int], params: SamplingParams, choices: list[_Choice]
    ) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yields (choice index, text delta, finish reason or None) as tokens arrive."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(index: int, token: int | None, reason: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, token, reason))

        request = GenerationRequest(prompt, params, on_event)
        try:
            batcher.submit(request)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        try:
            while not all(c.finish for c in choices):
                index, token, reason = await events.get()
                ch = choices[index]
                if ch.finish is not None:  # ended by a stop string; the row is being cancelled
                    continue
                if token is not None:
                    delta = ch.add(token)
                    if delta or ch.finish:
                        yield index, delta, ch.finish
                    continue
                if reason.startswith("error"):
                    raise APIError(500, f"generation failed ({reason})", type_="server_error")
                ch.finish = "length" if reason == "length" else "stop"
                yield index, ch.flush(), ch.finish
        finally:
            request.cancelled.set()  # done, or the client went away: free the batch rows

    async def _respond(req: _Common, prompt: list[int], max_tokens: int | None, chat: bool):
        _check(req)
        params = _params(req, len(prompt), max_tokens)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        choice_states = [_Choice(tokenizer, stop_ids, stop) for _ in range(params.n)]

        def usage() -> dict:
            completion = sum(c.n_tokens for c in choice_states)
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}  # fmt: skip

        def tokens() -> AsyncIterator[tuple[int, str, str | None]]:
            return _run(prompt, params, choice_states)

        if not req.stream:
            texts: list[str] = [""] * params.n
            reasons: list[str | None] = [None] * params.n
            async for index, delta, reason in tokens():
                texts[index] += delta
                reasons[index] = reason or reasons[index]
            choices: list[dict[str, Any]]
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]  # fmt: skip
            else:
                choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]  # fmt: skip
            return {"id": rid, "object": obj, "created": int(time.time()), "model": served_name,
                    "choices": choices, "usage": usage()}  # fmt: skip

        # Streaming: validate and start before the 200 goes out, so errors keep their status.
        gen = tokens()
        first = await anext(gen, None)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(index: int, delta: str, reason: str | None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta} if role else ({"content": delta} if delta else {})
                c = {"index": index, "delta": d, "finish_reason": reason}
            else:
                c = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
            body = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                    "model": served_name, "choices": [c]}  # fmt: skip
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            if chat:
                for i in range(params.n):
                    yield chunk(i, "", None, role=True)
            item = first
            while item is not None:
                yield chunk(*item)
                item = await anext(gen, None)
            if include_usage:
                body = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                        "model": served_name, "choices": [], "usage": usage()}  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        from shared.nanochat.chat_format import render_for_completion

        messages = [
            {"role": m.role, "content": _text_content(m.content, i)} for i, m in enumerate(req.messages)
        ]
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "the last message must be from the user", param="messages")
        try:
            prompt = render_for_completion(tokenizer, messages)
        except ValueError as e:
            raise APIError(400, f"invalid messages: {e}", param="messages") from e
        return await _respond(req, prompt, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if isinstance(req.prompt, str):
            if not req.prompt:  # as vLLM answers it
                raise APIError(
                    400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
                )
            prompt = prompt_ids(tokenizer, req.prompt)  # the BOS rule vLLM follows too
        else:
            bad = [t for t in req.prompt if not 0 <= t < tokenizer.vocab_size]
            if bad or not req.prompt:
                raise APIError(
                    400, f"prompt token ids must be in 0..{tokenizer.vocab_size - 1}", param="prompt"
                )
            prompt = list(req.prompt)
        return await _respond(req, prompt, req.max_tokens or 16, chat=False)

    return app


def create_app_from_export(export_dir: Path, served_name: str | None = None, *, device: str = "cpu",
                           max_batch: int = 16, api_key: str | None = None) -> FastAPI:  # fmt: skip
    from shared.nanochat.export import load_exported

    model, tok = load_exported(export_dir, device=device)
    return create_app(model, tok, served_name or Path(export_dir).name, max_batch=max_batch, api_key=api_key)
