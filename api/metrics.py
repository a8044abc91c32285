"""Prometheus metrics of the API, and /metrics.

Multi-process safe: under gunicorn with several workers, set PROMETHEUS_MULTIPROC_DIR (the
stack does) and prometheus_client keeps each process's values in files that /metrics merges.
Queue depth is read from Redis when scraped, so any API process reports the same figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import redis
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.openapi import Answers, spec
from api.services import db, services
from shared.enums import JobStatus
from shared.tables import Job

bp = Blueprint("metrics", __name__)

HTTP_REQUESTS = Counter("clipmask_http_requests", "HTTP requests answered", ["route", "method", "status"])
HTTP_LATENCY = Histogram(
    "clipmask_http_request_duration_seconds", "Time to answer an HTTP request", ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_CREATED = Counter("clipmask_jobs_created", "Jobs accepted (202)", ["source"])


class QueueDepthCollector(Collector):
    """clipmask_queue_depth{queue}: messages waiting in each Celery queue (Redis LLEN)."""

    def __init__(self, redis_url: str, prefix: str, queues: list[str]) -> None:
        self.redis_url, self.prefix, self.queues = redis_url, prefix, queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("clipmask_queue_depth", "Messages waiting in a queue", labels=["queue"])
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
            for queue in self.queues:
                family.add_metric([queue], float(client.llen(self.prefix + queue)))
            client.close()
        except redis.RedisError:
            pass  # no figure is better than a wrong one; /readyz tells that Redis is down
        yield family


class TenantShareCollector(Collector):
    """clipmask_tenant_queued{tenant} and clipmask_tenant_running{tenant}: each tenant's batch items
    on the bulk lane, waiting (in Postgres or in the queue) and at a worker: the scheduler's view."""

    def __init__(self, rows: list[tuple[str, str, int]]) -> None:
        self.rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("clipmask_tenant_queued", "A tenant's batch items waiting to run",
                                   labels=["tenant"])
        running = GaugeMetricFamily("clipmask_tenant_running", "A tenant's batch items running", labels=["tenant"])
        for tenant_id, status, count in self.rows:
            (running if status == JobStatus.RUNNING else queued).add_metric([tenant_id], float(count))
        yield queued
        yield running


def _tenant_rows(lane: str) -> list[tuple[str, str, int]]:
    rows = db().execute(select(Job.tenant_id, Job.status, func.count()).where(
        Job.lane == lane, Job.batch_id.isnot(None), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .group_by(Job.tenant_id, Job.status)).all()
    return [(tenant_id, status, int(count)) for tenant_id, status, count in rows]


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def install(app: Flask) -> None:
    """Time and count every request, labelled by route template (not by raw path)."""

    @app.before_request
    def _start() -> None:
        g.metrics_start = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        start = g.pop("metrics_start", None)
        route, method = _route(), request.method
        if start is not None:
            HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - start)
        HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
        return response


@bp.get("/metrics")
@spec.validate(resp=Answers(200, None, "Prometheus text format: clipmask_http_requests_total, "
                                       "clipmask_http_request_duration_seconds, clipmask_jobs_created_total, "
                                       "clipmask_queue_depth, clipmask_tenant_queued and clipmask_tenant_running "
                                       "(per tenant, the bulk lane)", public=True),
               security={}, operation_id="metrics", tags=["operations"], skip_validation=True)
def metrics() -> Response:
    """Prometheus metrics"""
    settings = services().settings
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # every gunicorn worker's values, merged
    else:
        registry = REGISTRY  # this process's values
    queues = CollectorRegistry()
    names = [settings.interactive_queue, settings.bulk_queue, settings.events_queue]
    queues.register(QueueDepthCollector(settings.redis_url, settings.redis_key_prefix, names))
    queues.register(TenantShareCollector(_tenant_rows(settings.bulk_queue)))
    return Response(generate_latest(registry) + generate_latest(queues), mimetype=CONTENT_TYPE_LATEST)
