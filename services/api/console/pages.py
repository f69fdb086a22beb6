"""The console's pages: `/` redirects to `/console/`, every `/console/...` path gets the app's
index.html (the app routes in the browser), and `/console/static/` serves its files.

The page carries a Content-Security-Policy: scripts only from this origin (plus the one inline
import map, allowed by its hash), no plugins, no framing. The bearer token lives in the browser's
sessionStorage, so keeping foreign script out is what keeps the token in.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/console"


def content_security_policy(html: str) -> str:
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in re.findall(r"<script type=\"importmap\">(.*?)</script>", html, flags=re.S)
    ]
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src 'self' {' '.join(hashes)}".strip(),
            "style-src 'self' 'unsafe-inline'",  # uPlot and the charts size elements inline
            "img-src 'self' blob: data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ]
    )


class ConsoleStatic(StaticFiles):
    """Static files that the browser revalidates: a new console version is picked up at once."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    index = (STATIC / "index.html").read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(index),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    # The static mount first: the page route below matches every other /console path.
    app.mount(f"{PREFIX}/static", ConsoleStatic(directory=STATIC), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.get(PREFIX, include_in_schema=False)
    def console_bare() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.get(PREFIX + "/{path:path}", include_in_schema=False)
    def console_page(path: str) -> Response:
        return HTMLResponse(index, headers=headers)
