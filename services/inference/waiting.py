"""What answers on the inference port while no engine does: before the first model is published,
and between an engine's crash and its restart.

`GET /health` says why nothing is served: 200 {"status": "waiting", "detail": "no model yet"} before
any publish (the service is fine, there is just nothing to serve: `docker compose up --wait` and a
fresh Helm install must not wait for a model), 503 while a published model's engine is not running.
Every other path is a 503 in the OpenAI error format. The supervisor closes this listener before it
starts an engine on the same port, so a client never gets an answer on an engine's behalf.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("ncp.serve")

# () -> (HTTP status of /health, detail): the supervisor's view of why no engine answers.
StatusFn = Callable[[], tuple[int, str]]


def _handler(status: StatusFn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _answer(self) -> None:
            code, detail = status()
            if self.path.split("?", 1)[0] == "/health":
                self._send(code, {"status": "waiting" if code == 200 else "unavailable", "detail": detail})
            else:
                self._send(503, {"error": {"message": detail, "type": "service_unavailable", "code": 503}})

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
            log.debug("waiting server: " + format, *args)

    return Handler


class WaitingServer:
    """A small threaded HTTP listener; start() and stop() are idempotent."""

    def __init__(self, host: str, port: int, status: StatusFn):
        self.host, self.port, self.status = host, port, status
        self._server: ThreadingHTTPServer | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            server = ThreadingHTTPServer((self.host, self.port), _handler(self.status))
        except OSError as e:  # e.g. an engine of a previous supervisor still holds the port
            log.warning("cannot answer on %s:%s while waiting: %s", self.host, self.port, e)
            return
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="ncp-waiting", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
