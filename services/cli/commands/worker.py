"""`ncp worker`: a Celery worker consuming some of the queues data / train / eval."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from shared.jobs.queues import EVAL, QUEUES, TRAIN


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run a Celery worker for the given queues")
    p.add_argument("--queues", default=None, help="comma list of queues (default: NCP_WORKER_QUEUES)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker processes (default 1; always 1 with the train queue)",
    )
    p.add_argument("--loglevel", default=None, help="default: NCP_LOG_LEVEL")
    p.add_argument(
        "--healthcheck",
        action="store_true",
        help="exit 0 once a worker on this host answers a ping through the broker (the images' "
        "HEALTHCHECK); returns on the first reply",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="run the start checks (GPU device access, NCP_HOME writable) and exit",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds --healthcheck waits for a reply")
    p.set_defaults(func=run)


def parse_queues(raw: str) -> list[str]:
    queues = [q.strip() for q in raw.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise ValueError(f"--queues must name some of {list(QUEUES)}, got {raw!r}")
    return queues


def worker_argv(queues: list[str], concurrency: int | None, loglevel: str) -> list[str]:
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    if TRAIN in queues:
        # One training task at a time per worker: it owns this worker's GPUs until it ends.
        if concurrency not in (None, 1):
            print(
                f"ncp worker: the train queue runs one task at a time; ignoring --concurrency {concurrency}",
                file=sys.stderr,
            )
        concurrency = 1
    name = f"{'+'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    return [
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(concurrency or 1),
        "-n",
        name,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def healthcheck(timeout: float) -> int:
    """0 when a worker node on this host (named `...@<hostname>` by worker_argv) answers a ping.
    Addressed by pattern with limit=1, so it returns on the first reply instead of collecting
    replies until the timeout as `celery inspect ping` does."""
    from services.worker.celery_app import app

    host = socket.gethostname()
    replies = app.control.broadcast(
        "ping", reply=True, timeout=timeout, limit=1, pattern=f"*@{host}", matcher="glob"
    )
    nodes = [name for reply in replies or [] for name, answer in reply.items() if answer == {"ok": "pong"}]
    if not nodes:
        print(f"ncp worker: no worker on {host} answered a ping within {timeout:g} s", file=sys.stderr)
        return 1
    print(f"ncp worker: {nodes[0]} OK")
    return 0


def start_problems(queues: list[str], home: Path) -> list[str]:
    from services.train_worker.startcheck import gpu_access_problems, home_problem

    problems = gpu_access_problems() if {TRAIN, EVAL} & set(queues) else []
    home_err = home_problem(home)
    return problems + ([home_err] if home_err else [])


def run(args: argparse.Namespace) -> int:
    from shared.settings import get_settings

    if args.healthcheck:
        return healthcheck(args.timeout)
    settings = get_settings()
    queues = parse_queues(args.queues or settings.worker_queues)
    argv = worker_argv(queues, args.concurrency, args.loglevel or settings.log_level)
    problems = start_problems(queues, settings.home)
    for problem in problems:
        print(f"ncp worker: cannot start: {problem}", file=sys.stderr)
    if problems or args.check:
        return 2 if problems else 0
    from services.worker.celery_app import app

    print(f"ncp worker: queues {queues}, broker {_redact(settings.broker_url or '')}", flush=True)
    app.worker_main(argv)
    return 0


def _redact(url: str) -> str:
    # Never print a broker password.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
