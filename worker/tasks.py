"""Thin Celery tasks: take an id, call the code that does the work, retry what is transient."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

import redis
from celery import Celery, Task

from shared.batches import finalize
from shared.followups import Effects, after_commit
from shared.queue import (
    DELIVER_TASK,
    DISPATCH_TASK,
    EMBED_TASK,
    FINALIZE_TASK,
    RECONCILE_TASK,
    RETENTION_TASK,
    SEGMENT_TASK,
)
from shared.reconcile import reconcile_from_settings
from shared.retention import purge_from_settings
from shared.search import answer_embedding
from shared.settings import Settings
from shared.webhooks import dispatcher_from_settings
from worker.deps import RunnerDeps, TransientError
from worker.query_embedding import embed_query
from worker.runner import run_job

log = logging.getLogger(__name__)


def register_tasks(app: Celery, get_deps: Callable[[], RunnerDeps], *, settings: Settings) -> None:
    max_retries = settings.job_max_retries
    backoff = settings.job_retry_backoff_s

    @app.task(name=SEGMENT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=max_retries)
    def segment(self: Task, job_id: str) -> str:
        try:
            return run_job(job_id, deps=get_deps(), retry_storage=self.request.retries < max_retries)
        except TransientError as exc:
            # Exponential backoff. Past the last retry the message is dropped, but the row is not:
            # the reconciler re-enqueues a job left queued or leased by a dead attempt.
            raise self.retry(exc=exc, countdown=min(300.0, backoff * 2 ** self.request.retries)) from exc

    replies: list[redis.Redis] = []

    @app.task(name=EMBED_TASK)
    def embed_search_query(reply_key: str, query: dict[str, Any], deadline: float) -> bool:
        """Embed a search query for the API, which waits on `reply_key` until `deadline`."""
        if time.time() > deadline:
            log.info("search query arrived after its deadline; dropped", extra={"reply_key": reply_key})
            return False
        if not replies:
            replies.append(redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5))
        image = None
        if "image_key" in query:  # an uploaded query image, staged in Redis by the API
            image = cast(bytes | None, replies[0].get(query["image_key"]))
            if image is None:
                log.info("search query image expired before it was embedded; dropped", extra={"reply_key": reply_key})
                return False
        answer = embed_query(query, get_deps(), image=image)
        answer_embedding(replies[0], reply_key, answer)
        return True

    @app.task(name=RECONCILE_TASK, acks_late=True)
    def reconcile_jobs() -> dict[str, int]:
        report = reconcile_from_settings(settings, sessions=get_deps().sessions, celery=app)
        return {"requeued_running": len(report.requeued_running), "reenqueued_queued": len(report.reenqueued_queued),
                "batches_finalized": len(report.batches)}

    @app.task(name=RETENTION_TASK, acks_late=True)
    def retention() -> dict[str, int]:
        deps = get_deps()
        return asdict(purge_from_settings(settings, sessions=deps.sessions, storage=deps.storage))

    @app.task(name=DELIVER_TASK, acks_late=True)
    def deliver_webhooks(delivery_ids: list[str]) -> int:
        return dispatcher_from_settings(settings, get_deps().sessions).dispatch(ids=delivery_ids)

    @app.task(name=DISPATCH_TASK, acks_late=True)
    def dispatch_webhooks() -> int:
        return dispatcher_from_settings(settings, get_deps().sessions).dispatch()

    @app.task(name=FINALIZE_TASK, acks_late=True)
    def finalize_batch(batch_id: str) -> bool:
        deps = get_deps()
        delivery = finalize(deps.sessions, deps.storage, batch_id)
        if delivery:
            after_commit(app, deps.sessions, Effects.of(delivery_ids=[delivery]))
        return delivery is not None
