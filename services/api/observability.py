"""Prometheus metrics of the API: request counts and latency per route, jobs by status, and the
live numbers of every running job (step, loss, tokens/s, MFU, ETA, peak GPU memory) labelled by
job, name and stage. docs/grafana/training.json is a dashboard over them.

Each app owns its CollectorRegistry (no process-global metrics), so tests can build several apps.
Everything job-related is read from the registry at scrape time, so it is right for any number of
API replicas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db.models import Job
from shared.db.registry import count_jobs_by_status

log = logging.getLogger(__name__)


class JobsByStatus(Collector):
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("ncp_jobs", "Jobs in the registry by status", labels=["status"])
        up = GaugeMetricFamily("ncp_registry_up", "1 if the registry database answered this scrape")
        try:
            with self.sessions() as s:
                counts = count_jobs_by_status(s)
            for status, n in counts.items():
                g.add_metric([status], n)
            up.add_metric([], 1)
        except Exception as e:  # a scrape must not fail because the database is down
            log.warning("jobs-by-status scrape failed: %s", e)
            up.add_metric([], 0)
        yield g
        yield up


# (metric suffix, Job column, help). A job's live progress fields are overwritten at every
# forwarded progress record, so a scrape reads the newest values without touching the series.
JOB_GAUGES = (
    ("step", Job.step, "Current step of the job's running stage"),
    ("total_steps", Job.total_steps, "Steps the running stage will take"),
    ("loss", Job.loss, "Training loss (smoothed as the trainer reports it)"),
    ("tokens_per_second", Job.tokens_per_sec, "Training throughput in tokens per second"),
    ("mfu", Job.mfu, "Model FLOPs utilisation, 0..1"),
    ("eta_seconds", Job.eta_seconds, "Estimated seconds until the running stage finishes"),
    ("gpu_memory_peak_bytes", Job.peak_memory, "Peak accelerator memory of the training process"),
)
LIVE_STATUSES = ("running", "cancelling")


class RunningJobs(Collector):
    """ncp_job_<name>{job, name, stage} for every running job; a job no longer running vanishes."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["job", "name", "stage"]
        families = [GaugeMetricFamily(f"ncp_job_{n}", h, labels=labels) for n, _, h in JOB_GAUGES]
        try:
            with self.sessions() as s:
                rows = s.execute(
                    select(Job.id, Job.spec, Job.current_stage, *(col for _, col, _ in JOB_GAUGES)).where(
                        Job.status.in_(LIVE_STATUSES)
                    )
                ).all()
        except Exception as e:  # the registry being down is ncp_registry_up's to report
            log.warning("running-jobs scrape failed: %s", e)
            rows = []
        for job_id, spec, stage, *values in rows:
            name = str((spec or {}).get("name") or "")
            for family, value in zip(families, values, strict=True):
                if value is not None:
                    family.add_metric([job_id, name, stage or ""], float(value))
        yield from families


def install(app: FastAPI, sessions: sessionmaker[Session]) -> CollectorRegistry:
    reg = CollectorRegistry()
    requests = Counter("ncp_api_requests", "HTTP requests", ["method", "route", "status"], registry=reg)
    latency = Histogram(
        "ncp_api_request_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=reg,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    reg.register(JobsByStatus(sessions))
    reg.register(RunningJobs(sessions))

    @app.middleware("http")
    async def _measure(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # Route templates (/jobs/{job_id}), not raw paths, keep label cardinality bounded.
            route = getattr(request.scope.get("route"), "path", "unmatched")
            requests.labels(request.method, route, str(status)).inc()
            latency.labels(request.method, route).observe(time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=True, tags=["health"], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    return reg
