"""Prometheus metrics: request latency in this process; job counts and durations from the database,
so that every API replica reports the same truth whatever worker ran the jobs."""

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select

from storage.db import session_scope
from storage.models import Job

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class JobsCollector:
    def __init__(self, db_url: str):
        self.db_url = db_url

    def collect(self):
        with session_scope(self.db_url) as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            duration = func.extract("epoch", Job.finished_at) - func.extract("epoch", Job.started_at)
            if session.bind.dialect.name == "sqlite":
                duration = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
            finished = (Job.status == "succeeded") & Job.started_at.is_not(None)
            row = session.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(duration), 0.0),
                    *[func.sum(case((duration <= bound, 1), else_=0)) for bound in DURATION_BUCKETS],
                ).where(finished)
            ).one()
        jobs = GaugeMetricFamily("rebasin_jobs", "Jobs by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("rebasin_queue_depth", "Jobs waiting for a worker.", value=counts.get("queued", 0))
        total, total_seconds, *cumulative = row
        buckets = [(str(bound), int(n or 0)) for bound, n in zip(DURATION_BUCKETS, cumulative)] + [("+Inf", int(total))]
        histogram = HistogramMetricFamily("rebasin_job_duration_seconds", "Run time of succeeded jobs.")
        histogram.add_metric([], buckets, float(total_seconds))
        yield histogram


def create_registry(db_url: str) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    latency = Histogram(
        "rebasin_http_request_duration_seconds", "HTTP request latency.", ["method", "route", "status"], registry=registry
    )
    registry.register(JobsCollector(db_url))
    return registry, latency


class RequestMetrics:
    """Times every request, labelled by route template (not raw path: ids would explode the series)."""

    def __init__(self, app, latency: Histogram):
        self.app, self.latency = app, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], route, str(status["code"])).observe(time.perf_counter() - started)
