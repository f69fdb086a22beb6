"""Console benchmark: a whole 29,000-step run's metrics, as the API serves them and as the job page
draws them.

Run: .venv/bin/python bench/console.py [--steps 29000] [--repeats 20] [--pages 5] [--points 1000]

A fresh PostgreSQL database (127.0.0.1:5432, Alembic-migrated) gets one job with --steps steps of
six series (the seed's d24 run: 29,000 steps, 174,000 rows), bulk-inserted. The real API
(`uvicorn services.api.app:create_app --factory`, one process) serves it, and Debian's Chromium
(headless, driven by Playwright) opens the console's job page. Measured:

- GET /jobs/{id}/metrics?points=N: the whole run downsampled on the server (min/max per bucket);
- GET /jobs/{id}/metrics (one cursor page of raw rows), for comparison;
- the job page: from navigation start to every pretraining chart drawn with the whole curve
  (`performance.now()` in the page when the train-loss chart holds its last point).

Reference: GET /jobs/{id} on the same server (one registry read, same HTTP stack). Target: the
request and the page's chart each under one second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from services.api.migrate import upgrade  # noqa: E402
from shared.db import registry  # noqa: E402
from shared.db.models import Metric  # noqa: E402
from shared.db.session import make_engine, make_session_factory  # noqa: E402
from shared.jobs.spec import demo_spec  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SERIES = ("loss", "raw_loss", "lr_mult", "tokens_per_sec", "mfu", "peak_memory_bytes")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TARGET_MS = 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def value(name: str, step: int) -> float:
    return {
        "loss": 10 * math.exp(-step / 5000) + 2,
        "raw_loss": 10 * math.exp(-step / 5000) + 2 + 0.3 * math.sin(step * 7.1),
        "lr_mult": min(1.0, 2 * (1 - step / 29_000)),
        "tokens_per_sec": 50_000 + 100 * math.sin(step / 3),
        "mfu": 0.4 + 0.01 * math.cos(step / 5),
        "peak_memory_bytes": 80e9,
    }[name]


def fill(db_url: str, steps: int) -> str:
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            job_id = registry.create_job(s, demo_spec(name="bench-29k")).id
            registry.set_job_status(s, job_id, "running")
            registry.set_job_status(s, job_id, "succeeded")
        now = dt.datetime.now(dt.timezone.utc)
        rows = [
            {"job_id": job_id, "stage": "pretrain", "step": st, "name": n, "value": value(n, st), "ts": now}
            for st in range(1, steps + 1)
            for n in SERIES
        ]
        with engine.begin() as conn:
            for i in range(0, len(rows), 20_000):
                conn.execute(insert(Metric), rows[i : i + 20_000])
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE metrics")
        return job_id
    finally:
        engine.dispose()


def latencies(client: httpx.Client, path: str, n: int, params: dict | None = None) -> tuple[list[float], int]:
    out, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:300]
        size = len(r.content)
    return out, size


def page_times(url: str, job_id: str, n: int, chromium: str) -> list[float]:
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for i in range(n + 1):  # the first load warms the browser's caches and is not counted
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}/console/jobs/{job_id}")
                ms = page.wait_for_function(
                    """() => {
                      const c = document.querySelector('[data-testid=chart-pretrain-loss]');
                      return c && c.querySelector('canvas') && Number(c.dataset.points) > 0 ? performance.now() : null;
                    }""",
                    polling="raf",
                    timeout=60_000,
                ).json_value()
                if i:
                    out.append(ms / 1000.0)
                page.close()
        finally:
            browser.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=29_000)
    ap.add_argument("--repeats", type=int, default=20, help="requests per latency row")
    ap.add_argument("--pages", type=int, default=5, help="page loads measured")
    ap.add_argument("--points", type=int, default=1000, help="points per series (what the job page asks for)")
    ap.add_argument("--chromium", default=os.environ.get("NCP_TEST_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()

    db = f"ncp_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"ncp_bench_home_{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update(NCP_HOME=str(home), NCP_DATABASE_URL=db_url, NCP_LOG_LEVEL="WARNING")
    proc = None
    try:
        upgrade(db_url)
        t0 = time.perf_counter()
        job_id = fill(db_url, args.steps)
        print(f"(filled {args.steps:,} steps x {len(SERIES)} series in {time.perf_counter() - t0:.1f} s)")
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("API did not start")
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=60) as c:
            path = f"/jobs/{job_id}/metrics"
            for _ in range(3):  # warm-up: connections, first-import costs, the database's caches
                c.get(path, params={"points": args.points})
            body = c.get(path, params={"points": args.points}).json()
            kept = sum(len(v) for v in body["series"].values())
            assert body["mode"] == "downsampled" and all(
                v[-1]["step"] == args.steps for v in body["series"].values()
            )
            status, _ = latencies(c, f"/jobs/{job_id}", args.repeats)
            down, down_size = latencies(c, path, args.repeats, {"points": args.points})
            paged, paged_size = latencies(c, path, args.repeats, {"limit": 10_000})
        pages = page_times(url, job_id, args.pages, args.chromium)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    ms = 1000.0
    ref = pct(status, 0.5) * ms
    rows = [
        ("GET /jobs/{id} p50 (reference)", ref, ref, "ms"),
        (f"GET metrics?points={args.points} p50", pct(down, 0.5) * ms, ref, "ms"),
        (f"GET metrics?points={args.points} p90", pct(down, 0.9) * ms, ref, "ms"),
        ("GET metrics (one 10,000-row page) p50", pct(paged, 0.5) * ms, ref, "ms"),
        ("job page: charts drawn, p50", pct(pages, 0.5) * ms, ref, "ms"),
        ("job page: charts drawn, max", max(pages) * ms, ref, "ms"),
    ]
    print(
        f"Console benchmark: PostgreSQL registry, 1 uvicorn process, headless Chromium, {os.cpu_count()} CPUs; "
        f"{args.steps:,} steps x {len(SERIES)} series = {args.steps * len(SERIES):,} rows; {args.repeats} requests "
        f"per request row, {len(pages)} page loads"
    )
    print(f"| {'measurement':40} | {'value':>10} | {'reference':>10} | {'ratio':>7} | unit |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 12}|{'-' * 9}|------|")
    for name, v, r, unit in rows:
        print(f"| {name:40} | {v:10.1f} | {r:10.1f} | {v / r:7.1f} | {unit:4} |")
    print(
        f"(downsampled answer: {kept:,} points, {down_size / 1e6:.2f} MB; raw page: {paged_size / 1e6:.2f} MB; "
        f"target: request and page each under {TARGET_MS:.0f} ms)"
    )
    slow = [n for n, v, _, _ in rows[1:2] + rows[4:5] if v > TARGET_MS]
    if slow:
        print(f"OVER TARGET: {', '.join(slow)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
