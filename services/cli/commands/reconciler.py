"""`ncp reconciler`: re-enqueue jobs the registry says should run but no live worker holds.

Each completed pass touches a heartbeat file; `ncp reconciler --healthcheck` (the compose health
check) passes while the newest pass is recent, so "healthy" means "reconciling", not just "alive".
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HEARTBEAT = Path(tempfile.gettempdir()) / "ncp-reconciler.alive"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconciler", help="re-enqueue lost jobs; fail them after max attempts")
    p.add_argument("--once", action="store_true", help="one pass, print what was done, exit")
    p.add_argument("--interval", type=float, default=None, help="seconds between passes (default: settings)")
    p.add_argument(
        "--healthcheck",
        action="store_true",
        help=f"exit 0 if a reconciler on this host completed a pass recently ({HEARTBEAT})",
    )
    p.set_defaults(func=run)


def healthcheck(interval: float) -> int:
    # Three missed passes (at least a minute) before a reconciler counts as stuck.
    limit = max(3 * interval, 60.0)
    try:
        age = time.time() - HEARTBEAT.stat().st_mtime
    except FileNotFoundError:
        print(f"ncp reconciler: no pass completed yet ({HEARTBEAT} missing)", file=sys.stderr)
        return 1
    if age > limit:
        print(f"ncp reconciler: last completed pass {age:.0f} s ago (limit {limit:.0f} s)", file=sys.stderr)
        return 1
    print(f"ncp reconciler: last pass {age:.0f} s ago")
    return 0


def run(args: argparse.Namespace) -> int:
    from services.worker.dispatch import enqueue_job, sessions_for, waiting_messages
    from services.worker.reconciler import ReconcileConfig, reconcile_once, run_forever
    from shared.settings import get_settings

    settings = get_settings()
    if args.healthcheck:
        return healthcheck(args.interval or settings.reconcile_interval_seconds)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ReconcileConfig.from_settings(settings)
    if args.interval is not None:
        cfg = ReconcileConfig(cfg.max_attempts, cfg.grace_seconds, args.interval)
    sessions = sessions_for(settings)

    def enqueue(job_id: str) -> str | None:
        return enqueue_job(job_id, settings)

    def report(actions: list) -> None:
        HEARTBEAT.touch()
        for a in actions:
            print(
                f"reconciler: job {a.job_id} {a.action}"
                + (f" ({a.stage})" if a.stage else "")
                + (f": {a.detail}" if a.detail else ""),
                flush=True,
            )

    if args.once:
        report(reconcile_once(sessions, cfg, enqueue, waiting=lambda: waiting_messages(settings)))
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"ncp reconciler: every {cfg.interval_seconds:g}s, grace {cfg.grace_seconds:g}s, "
        f"max attempts {cfg.max_attempts}",
        flush=True,
    )
    run_forever(sessions, cfg, enqueue, stop, on_pass=report, waiting=lambda: waiting_messages(settings))
    return 0
