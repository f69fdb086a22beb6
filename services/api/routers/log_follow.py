"""Follow one log file of a job by byte offset: what `ncp jobs logs -f` and the console's log pane
read. `GET /jobs/{id}/logs` gives the last lines of every log; this route gives what was appended
after a given offset, so a follower prints each line once however fast the file grows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError
from shared.db import registry
from shared.paths import PathEscapeError, run_paths, safe_join

router = APIRouter(prefix="/jobs/{job_id}/logs", tags=["job data"])

MAX_CHUNK_BYTES = 1024 * 1024
TAIL_BYTES = 64 * 1024  # where a follower without an offset starts: about the last 500 lines


class LogChunk(BaseModel):
    file: str
    offset: int = Field(description="Byte offset the text starts at")
    next_offset: int = Field(description="Pass as ?offset= to get what comes next")
    size: int = Field(description="File size in bytes when read")
    text: str = Field(description="Whole lines only; a line still being written waits for the next read")


@router.get("/{file}", response_model=LogChunk, responses=_ERRORS, summary="Follow one log file by offset")
def follow_log(
    job_id: str,
    file: str,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    offset: Annotated[
        int | None,
        Query(ge=0, le=2**62, description="Byte offset; omitted = start near the end (about 64 KiB back)"),
    ] = None,
    max_bytes: Annotated[int, Query(ge=1024, le=MAX_CHUNK_BYTES)] = MAX_CHUNK_BYTES,
) -> LogChunk:
    registry.get_job(session, job_id)
    if not file.endswith(".log"):
        raise ApiError(422, "validation_error", "file must name a .log file", "file")
    try:
        path = safe_join(run_paths(settings.runs_dir, job_id).logs, file)
    except PathEscapeError as e:
        raise ApiError(422, "validation_error", str(e), "file") from None
    if not path.is_file():
        raise ApiError(404, "not_found", f"no log file {file!r} for job {job_id}", "file")
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if offset is None:
            start = max(0, size - TAIL_BYTES)
            if start > 0:  # begin at the first whole line inside the tail window
                f.seek(start - 1)
                head = f.read(min(size - start + 1, TAIL_BYTES))
                nl = head.find(b"\n")
                start = start + nl if nl != -1 else size
        else:
            start = offset if offset <= size else 0  # a file cut shorter was rewritten: read it anew
        f.seek(start)
        block = f.read(min(max_bytes, size - start))
    end = block.rfind(b"\n")
    data = block[: end + 1] if end != -1 else b""
    return LogChunk(
        file=file,
        offset=start,
        next_offset=start + len(data),
        size=size,
        text=data.decode("utf-8", errors="replace"),
    )
