"""Prometheus metrics of the API: request counts and latency per route, jobs by status.

Each app owns its CollectorRegistry (no process-global metrics), so tests can build several apps.
Jobs by status is read from the registry at scrape time, so it is right for any number of API
replicas.
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
from sqlalchemy.orm import Session, sessionmaker

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

    @app.get(
        "/metrics",
        include_in_schema=True,
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    def metrics() -> Response:
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    return reg
