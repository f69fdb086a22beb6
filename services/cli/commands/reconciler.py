"""`ncp reconciler`: re-enqueue jobs the registry says should run but no live worker holds."""

from __future__ import annotations

import argparse
import logging
import signal
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconciler", help="re-enqueue lost jobs; fail them after max attempts")
    p.add_argument("--once", action="store_true", help="one pass, print what was done, exit")
    p.add_argument("--interval", type=float, default=None, help="seconds between passes (default: settings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.worker.reconciler import ReconcileConfig, reconcile_once, run_forever
    from shared.db.session import cached_session_factory
    from shared.jobs.dispatch import enqueue_job, waiting_messages
    from shared.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ReconcileConfig.from_settings(settings)
    if args.interval is not None:
        cfg = ReconcileConfig(cfg.max_attempts, cfg.grace_seconds, args.interval)
    sessions = cached_session_factory(settings)

    def enqueue(job_id: str) -> str | None:
        return enqueue_job(job_id, settings)

    def report(actions: list) -> None:
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
