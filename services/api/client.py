"""A small synchronous client of the job API (used by `ncp jobs` and `ncp demo`).

Errors come back as ApiClientError carrying the API's {"error": {code, message, field}} body, so
a CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared.settings import Settings, get_settings

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
START_HINT = (
    "start a local platform with `ncp up` (or `ncp demo`), or point NCP_API_URL (and NCP_API_TOKEN) "
    "at a running one"
)
FULL_ID_LENGTH = 36  # a job id is a UUID


class ApiClientError(RuntimeError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        where = f" (field {field})" if field else ""
        super().__init__(f"HTTP {status} {code}: {message}{where}")
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class SSEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data) if self.data else None


def parse_sse(lines: Iterator[str]) -> Iterator[SSEvent]:
    """Server-sent events from a line iterator (comments/pings skipped, multi-line data joined)."""
    cur = SSEvent()
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if data or cur.id is not None or cur.event != "message":
                cur.data = "\n".join(data)
                yield cur
            cur, data = SSEvent(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            cur.event = value
        elif name == "id":
            cur.id = value


@dataclass
class JobsClient:
    base_url: str
    token: str | None = None
    timeout: float = 30.0
    _http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> JobsClient:
        s = settings or get_settings()
        assert s.api_url is not None
        return cls(s.api_url, s.api_token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiClientError(
                0, "unreachable", f"cannot reach the API at {self.base_url} ({e}); {START_HINT}"
            ) from None
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
            except ValueError:
                err = {}
            raise ApiClientError(
                r.status_code,
                err.get("code", "http_error"),
                err.get("message", r.text[:500]),
                err.get("field"),
            )
        return r

    # --- jobs --------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/jobs", json=spec, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def list_jobs(
        self,
        status: list[str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        id_prefix: str | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if id_prefix:
            params["id_prefix"] = id_prefix
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", "/jobs", params=params).json()

    def resolve(self, job_id: str) -> str:
        """The full id of `job_id`, which may be a short prefix (as `ncp jobs watch` prints) when
        exactly one job's id starts with it."""
        if len(job_id) >= FULL_ID_LENGTH:
            return job_id
        found = [j["id"] for j in self.list_jobs(limit=2, id_prefix=job_id)["data"]]
        if not found:
            raise ApiClientError(404, "job_not_found", f"no job id starts with {job_id!r}")
        if len(found) > 1:
            raise ApiClientError(
                409,
                "ambiguous_job_id",
                f"{job_id!r} is the start of several job ids ({', '.join(found)}, ...)",
            )
        return found[0]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/resume").json()

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}/events", params={"after": after, "limit": limit}).json()

    def logs(self, job_id: str, lines: int = 200, file: str | None = None) -> dict[str, str]:
        params: dict[str, Any] = {"lines": lines}
        if file:
            params["file"] = file
        return self._request("GET", f"/jobs/{job_id}/logs", params=params).json()["logs"]

    def log_chunk(self, job_id: str, file: str, offset: int | None = None) -> dict[str, Any]:
        """What `file` gained after byte `offset` (None: its last ~64 KiB), whole lines only."""
        params = {"offset": offset} if offset is not None else None
        return self._request("GET", f"/jobs/{job_id}/logs/{file}", params=params).json()

    def kernels(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Training stage -> the kernel report its trainer wrote (what runs on the device)."""
        return self._request("GET", f"/jobs/{job_id}/kernels").json()["stages"]

    def metrics(self, job_id: str, names: list[str] | None = None) -> dict[str, Any]:
        return self._request(
            "GET", f"/jobs/{job_id}/metrics", params={"name": names} if names else None
        ).json()

    def list_models(self) -> dict[str, Any]:
        return self._request("GET", "/models").json()

    def get_model(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/models/{name}").json()

    def serve_model(self, name: str, phase: str | None = None, step: int | None = None) -> dict[str, Any]:
        return self._request("POST", f"/models/{name}/serve", json={"phase": phase, "step": step}).json()

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[SSEvent]:
        """Follow the job's SSE stream until the server ends it (job finished)."""
        try:
            with self._http.stream(
                "GET",
                f"/jobs/{job_id}/events",
                params={"after": after},
                headers={"Accept": "text/event-stream"},
                timeout=httpx.Timeout(self.timeout, read=None),
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    err = r.json().get("error", {})
                    raise ApiClientError(r.status_code, err.get("code", "http_error"), err.get("message", ""))
                yield from parse_sse(r.iter_lines())
        except httpx.TransportError as e:
            raise ApiClientError(0, "unreachable", f"event stream from {self.base_url} broke: {e}") from None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def progress_line(job: dict[str, Any]) -> str:
    """One line: status, stage, step/total, loss, tokens/s, MFU, ETA."""
    p = job.get("progress") or {}
    parts = [f"{job['id'][:8]} {job['status']}"]
    if job.get("current_stage"):
        parts.append(f"stage {job['current_stage']}")
    if p.get("step") is not None:
        total = p.get("total_steps")
        pct = f" ({p['stage_percent']:.0f}%)" if p.get("stage_percent") is not None else ""
        parts.append(f"step {p['step']}/{total if total is not None else '?'}{pct}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("tokens_per_sec") is not None:
        tps = p["tokens_per_sec"]
        parts.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    if p.get("mfu") is not None:
        parts.append(f"MFU {100 * p['mfu']:.1f}%")
    if p.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(p['eta_seconds'])}")
    parts.append(f"job {p.get('percent', 0):.0f}%")
    if job.get("error"):
        parts.append(f"error {job['error'].get('code')}: {job['error'].get('message')}")
    return " | ".join(parts)
