"""Job API benchmark: submission latency and status-polling throughput.

Run: .venv/bin/python bench/api.py [--submits 200] [--seconds 3] [--clients 8]

Starts the real API (`uvicorn services.api.app:create_app --factory`, one worker process) against a
fresh PostgreSQL database (127.0.0.1:5432, migrated with Alembic) and Redis (db 14) as the broker,
so every POST /jobs validates the spec, writes the job + stages + events and enqueues the first
stage. The reference measured in the same run is GET /healthz, which goes through the same
server, middleware and HTTP stack but touches neither the database nor the broker; the ratios say
what the registry and the broker cost on top of the bare request path.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from services.api.migrate import upgrade  # noqa: E402
from shared.jobs.spec import demo_spec  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_DB = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latencies(client: httpx.Client, n: int, request) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        resp = request(client, i)
        out.append(time.perf_counter() - t0)
        assert resp.status_code < 300, resp.text
    return out


def throughput(url: str, path: str, clients: int, seconds: float) -> float:
    """Requests/s over `seconds` with `clients` threads, each with its own keep-alive connection."""
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        with httpx.Client(base_url=url) as c:
            while time.perf_counter() < stop:
                assert c.get(path).status_code == 200
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--submits", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    db = f"ncp_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"ncp_bench_home_{secrets.token_hex(4)}"
    env = dict(
        os.environ,
        NCP_HOME=str(home),
        NCP_DATABASE_URL=db_url,
        NCP_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        NCP_LOG_LEVEL="WARNING",
    )
    proc = None
    try:
        upgrade(db_url)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "services.api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("API did not become ready")
            time.sleep(0.1)

        spec = demo_spec().model_dump(mode="json")
        with httpx.Client(base_url=url) as c:
            for _ in range(20):  # warm-up: connections, caches, first-import costs
                c.get("/healthz")
                c.post("/jobs", json=spec)
            health = latencies(c, args.submits, lambda c, i: c.get("/healthz"))
            submit = latencies(c, args.submits, lambda c, i: c.post("/jobs", json=spec))
            keyed = latencies(
                c,
                args.submits // 2,
                lambda c, i: c.post("/jobs", json=spec, headers={"Idempotency-Key": f"k{i % 10}"}),
            )
            job_id = c.get("/jobs", params={"limit": 1}).json()["data"][0]["id"]
            status = latencies(c, args.submits, lambda c, i: c.get(f"/jobs/{job_id}"))

        health_rps_1 = throughput(url, "/healthz", 1, args.seconds)
        status_rps_1 = throughput(url, f"/jobs/{job_id}", 1, args.seconds)
        health_rps_n = throughput(url, "/healthz", args.clients, args.seconds)
        status_rps_n = throughput(url, f"/jobs/{job_id}", args.clients, args.seconds)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        try:
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
        except Exception as e:  # a leftover benchmark queue is harmless; say so and go on
            print(f"(could not clean Redis db {REDIS_DB}: {e})", file=sys.stderr)

    ms = 1000.0
    rows = [
        ("GET /healthz latency p50 (reference)", pct(health, 0.5) * ms, pct(health, 0.5) * ms, "ms"),
        ("GET /healthz latency p99 (reference)", pct(health, 0.99) * ms, pct(health, 0.99) * ms, "ms"),
        ("POST /jobs latency p50", pct(submit, 0.5) * ms, pct(health, 0.5) * ms, "ms"),
        ("POST /jobs latency p99", pct(submit, 0.99) * ms, pct(health, 0.99) * ms, "ms"),
        ("POST /jobs (repeated Idempotency-Key) p50", pct(keyed, 0.5) * ms, pct(health, 0.5) * ms, "ms"),
        ("GET /jobs/{id} latency p50", pct(status, 0.5) * ms, pct(health, 0.5) * ms, "ms"),
        ("GET /jobs/{id} latency p99", pct(status, 0.99) * ms, pct(health, 0.99) * ms, "ms"),
        ("GET /jobs/{id} throughput, 1 client", status_rps_1, health_rps_1, "req/s"),
        (f"GET /jobs/{{id}} throughput, {args.clients} clients", status_rps_n, health_rps_n, "req/s"),
    ]
    print(
        f"API benchmark: PostgreSQL registry, Redis broker, 1 uvicorn process, {os.cpu_count()} CPUs; "
        f"{args.submits} requests per latency row, {args.seconds:.0f} s per throughput row"
    )
    print(f"| {'measurement':46} | {'value':>10} | {'reference':>10} | {'ratio':>6} | unit  |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 8}|-------|")
    for name, value, ref, unit in rows:
        print(f"| {name:46} | {value:10.2f} | {ref:10.2f} | {value / ref:6.2f} | {unit:5} |")
    print(f"(reference = GET /healthz on the same server; mean submit {statistics.mean(submit) * ms:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
