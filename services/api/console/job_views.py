"""Read models of a job's run folder that the console shows: the newest evaluation samples and the
run report rendered as HTML (raw HTML in the Markdown is escaped, not passed through: the report
quotes model output). Each training stage's kernel report is part of the job status
(GET /jobs/{id}: `kernels`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from markdown_it import MarkdownIt
from pydantic import BaseModel, Field

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError
from shared.db import registry
from shared.nanochat.eval.report import latest_eval
from shared.paths import run_paths

router = APIRouter(prefix="/jobs/{job_id}", tags=["job data"])

MAX_SAMPLES = 50
MAX_SAMPLE_CHARS = 4000


class Sample(BaseModel):
    prompt: str
    completion: str


class SamplesPublic(BaseModel):
    base: list[Sample] = Field(description="Base-model completions of the newest base evaluation")
    base_step: int | None = None
    chat: list[Sample] = Field(description="Chat-model answers of the newest chat evaluation")
    chat_step: int | None = None


def _samples(result: dict[str, Any] | None) -> list[Sample]:
    out = []
    for s in (result or {}).get("samples") or []:
        if isinstance(s, dict):
            out.append(
                Sample(
                    prompt=str(s.get("prompt", ""))[:MAX_SAMPLE_CHARS],
                    completion=str(s.get("completion", ""))[:MAX_SAMPLE_CHARS],
                )
            )
    return out[:MAX_SAMPLES]


@router.get("/samples", response_model=SamplesPublic, responses=_ERRORS, summary="Evaluation samples")
def job_samples(job_id: str, session: SessionDep, settings: SettingsDep, _auth: AuthDep) -> SamplesPublic:
    registry.get_job(session, job_id)
    eval_dir = run_paths(settings.runs_dir, job_id).eval
    base, chat = latest_eval(eval_dir, "base"), latest_eval(eval_dir, "chat")
    return SamplesPublic(
        base=_samples(base),
        base_step=(base or {}).get("step"),
        chat=_samples(chat),
        chat_step=(chat or {}).get("step"),
    )


_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


@router.get(
    "/report.html",
    response_class=HTMLResponse,
    responses={**_ERRORS, 200: {"content": {"text/html": {}}}},
    summary="The run report as an HTML fragment (images: GET /jobs/{id}/report/{name})",
)
def job_report_html(job_id: str, session: SessionDep, settings: SettingsDep, _auth: AuthDep) -> HTMLResponse:
    registry.get_job(session, job_id)
    report = run_paths(settings.runs_dir, job_id).report / "report.md"
    if not report.is_file():
        raise ApiError(404, "report_not_ready", f"job {job_id} has no report yet")
    html = _MARKDOWN.render(report.read_text(encoding="utf-8"))
    return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'none'; img-src 'self'"})
