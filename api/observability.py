"""Prometheus metrics at /metrics.

Request latency is measured here, in the API process. What the workers do is read from the database at
scrape time (jobs by status; epoch durations, which workers count as they write each epoch: kiln.epoch_counts) and
the broker (queue depth), so a worker needs no endpoint of its own and a scrape always agrees with what the API
serves.

With several API processes (`kiln up --api-workers N`, uvicorn --workers), a scrape reaches one of them: with
PROMETHEUS_MULTIPROC_DIR set (`kiln up` sets it when N > 1), each process writes its latency to files there and
every scrape reports the sum over all of them (prometheus_client's multiprocess mode).
"""

import os
import time

import redis
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from kiln import epoch_counts
from kiln.db import get_sessionmaker
from kiln.dispatch import predict_queue, worker_queues
from kiln.settings import Settings
from kiln.tables import Job, JobStatus


class Metrics:
    """One registry per app: request latency observed as requests pass, the rest collected per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.latency = Histogram(
            "kiln_http_request_duration_seconds", "API request latency, by route template.",
            ["method", "route", "status"], registry=None if shared else self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        if shared:  # every API process's latency, this one's included, read from the shared directory
            MultiProcessCollector(self.registry)
        self.registry.register(_StateCollector(settings))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        jobs = GaugeMetricFamily("kiln_jobs", "Jobs by status, all owners.", labels=["status"])
        with get_sessionmaker()() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            cumulative, count, total = epoch_counts.histogram(session)
            # kiln's own queues, and the named pools that queued jobs wait in
            pools = session.scalars(select(Job.queue).where(Job.status == JobStatus.queued).distinct()).all()
        queues = {*worker_queues(self.settings, gpu=True), *worker_queues(self.settings, gpu=False),
                  predict_queue(self.settings), *pools}
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        yield jobs
        epochs = HistogramMetricFamily("kiln_epoch_duration_seconds", "Duration of every epoch trained.")
        epochs.add_metric([], [(str(b), n) for b, n in cumulative] + [("+Inf", count)], sum_value=total)
        yield epochs
        depth = GaugeMetricFamily("kiln_queue_depth", "Messages waiting in the broker, by queue.", labels=["queue"])
        try:
            with redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2) as r:
                for queue in sorted(queues):
                    depth.add_metric([queue], r.llen(queue))
        except redis.RedisError:
            pass  # the broker is down: /readyz says so; the queue depth is simply absent from this scrape
        yield depth


class RequestTimer:
    """Pure ASGI middleware observing each request's latency under its route template (never the raw path,
    which would make one series per job id)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def timed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(scope["method"], route, f"{status // 100}xx").observe(
                time.perf_counter() - start
            )
