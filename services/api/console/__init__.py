"""The web console: a single-page app served by the API itself, same origin, same bearer token.

Pages (jobs, a job with live charts, a new-job form with its plan, chat, sign-in) are static files
under `static/`, libraries included (vendor/, pinned in vendor/vendor.json, re-fetched and checked
by scripts/vendor_console.py), so the console works offline and the api image carries it. The
routers here add what only the console needs: the pages themselves, a same-origin proxy to the
inference service's OpenAI-compatible endpoint (the browser never talks to the model server, and
the API's token guards the model too), and two read models of the run folder (samples, the
report rendered as HTML).
"""

from __future__ import annotations

from fastapi import FastAPI

from services.api.console import chat_proxy, job_views, pages


def install(app: FastAPI) -> None:
    pages.install(app)
    app.include_router(chat_proxy.router)
    app.include_router(job_views.router)
