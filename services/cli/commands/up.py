"""`ncp up`: the whole platform on one machine, no Docker.

Runs the registry migrations, then supervises the API, the workers (one per queue by default),
the reconciler and the inference supervisor as child processes: a crashed child is restarted
with backoff, Ctrl-C / SIGTERM stops every child's process group. By default the registry is a
SQLite file and the broker kombu's SQLite-backed transport, both under NCP_HOME, so nothing else
has to run; NCP_DATABASE_URL / NCP_BROKER_URL switch to PostgreSQL / Redis.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
from pathlib import Path

from shared.jobs.queues import QUEUES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="run API, workers, reconciler and inference on this machine")
    p.add_argument(
        "--workers",
        choices=("per-queue", "single"),
        default="per-queue",
        help="one worker process per queue (default) or one for all queues",
    )
    p.add_argument("--no-inference", action="store_true", help="do not start the model server")
    p.set_defaults(func=run)


def state_file(home: Path) -> Path:
    return home / "up.json"


def running_instance(home: Path) -> dict | None:
    """The state of a live `ncp up` for this NCP_HOME, or None."""
    try:
        state = json.loads(state_file(home).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return state


def child_specs(settings, workers: str, inference: bool) -> list:  # noqa: ANN001 - Settings
    from services.worker.supervisor import ChildSpec

    py = sys.executable
    ncp = [py, "-m", "services.cli.main"]
    repo = str(Path(__file__).resolve().parents[3])
    specs = [
        ChildSpec(
            "api",
            [
                py,
                "-m",
                "uvicorn",
                "services.api.app:create_app",
                "--factory",
                "--host",
                settings.api_host,
                "--port",
                str(settings.api_port),
            ],
            cwd=repo,
        ),
        ChildSpec("reconciler", [*ncp, "reconciler"], cwd=repo),
    ]
    groups = [[q] for q in QUEUES] if workers == "per-queue" else [list(QUEUES)]
    for queues in groups:
        specs.append(
            ChildSpec(f"worker-{'-'.join(queues)}", [*ncp, "worker", "--queues", ",".join(queues)], cwd=repo)
        )
    if inference:
        specs.append(ChildSpec("inference", [py, "-m", "services.inference.serve"], cwd=repo))
    return specs


def run(args: argparse.Namespace) -> int:
    from services.api.migrate import upgrade
    from services.worker.supervisor import Supervisor, SupervisorConfig
    from shared.settings import get_settings

    settings = get_settings()
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    other = running_instance(home)
    if other is not None:
        raise ValueError(f"ncp up is already running for {home} (pid {other['pid']}); stop it first")
    inference = not args.no_inference
    if inference and importlib.util.find_spec("services.inference.serve") is None:
        print(
            "ncp up: services.inference.serve is not installed; running without a model server",
            file=sys.stderr,
        )
        inference = False

    print(f"ncp up: home {home}", flush=True)
    print(
        f"ncp up: registry {_redact(settings.database_url or '')}, broker {_redact(settings.broker_url or '')}",
        flush=True,
    )
    assert settings.database_url is not None  # filled in by Settings
    upgrade(settings.database_url)  # migrations are a step before the API starts, never inside it
    specs = child_specs(settings, args.workers, inference)
    log_dir = home / "logs"
    sup = Supervisor(
        specs, SupervisorConfig(log_dir=log_dir), on_event=lambda msg: print(f"ncp up: {msg}", flush=True)
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    state_file(home).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "api_url": settings.api_url,
                "inference_url": settings.inference_url,
                "logs": str(log_dir),
                "children": [s.name for s in specs],
            }
        )
    )
    print(
        f"ncp up: console {settings.api_url}/console/, API {settings.api_url}, models {settings.inference_url}, "
        f"logs {log_dir}; Ctrl-C stops",
        flush=True,
    )
    try:
        sup.run(stop)
    finally:
        state_file(home).unlink(missing_ok=True)
    return 0


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
