"""The Celery application's shared configuration and the producer side (used by the API).

The API only sends task names and job ids; it never imports worker code (no torch there).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from typing import Any

import redis
from celery import Celery

from shared.settings import Settings

SEGMENT_TASK = "clipmask.segment"
RETENTION_TASK = "clipmask.retention"
RECONCILE_TASK = "clipmask.reconcile"
DELIVER_TASK = "clipmask.deliver_webhooks"  # send these delivery ids now
DISPATCH_TASK = "clipmask.dispatch_webhooks"  # send whatever is due (retries, leftovers)
FINALIZE_TASK = "clipmask.finalize_batch"
EMBED_TASK = "clipmask.embed_query"  # a search query to embed; the answer goes to a Redis reply key

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to the settings' Redis broker, with the delivery guarantees we rely on."""
    app = Celery("clipmask", broker=settings.redis_url, set_as_current=False)
    transport: dict[str, Any] = {
        "visibility_timeout": 3600, "socket_connect_timeout": 3, "socket_timeout": 10,
    }
    if settings.redis_key_prefix:
        transport["global_keyprefix"] = settings.redis_key_prefix
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.interactive_queue,
        task_routes={
            SEGMENT_TASK: {"queue": settings.interactive_queue},
            DELIVER_TASK: {"queue": settings.events_queue},
            DISPATCH_TASK: {"queue": settings.events_queue},
            FINALIZE_TASK: {"queue": settings.events_queue},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acknowledged after the task ran; a worker that dies mid-task leaves it to
        # be redelivered, and the job runner is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # `celery beat` (one per deployment) schedules retention; the task deletes in chunks.
        beat_schedule={
            "retention": {"task": RETENTION_TASK, "schedule": settings.retention_interval_s},
            # expires: a reconcile message older than one interval is dropped, not piled up
            "reconcile": {"task": RECONCILE_TASK, "schedule": settings.reconcile_interval_s,
                          "options": {"expires": settings.reconcile_interval_s}},
            "webhooks": {"task": DISPATCH_TASK, "schedule": settings.webhook_dispatch_interval_s,
                         "options": {"expires": settings.webhook_dispatch_interval_s}},
        },
    )
    return app


RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 1}


def base_queues(settings: Settings, base: str | None) -> tuple[str, str]:
    """(interactive, bulk) queues of the workers serving `base`: the plain ones for the default base
    (or None), else the same names with the base's slug, `interactive.facebook-sam3-1a2b3c4d`."""
    if base is None or base == settings.default_base:
        return settings.interactive_queue, settings.bulk_queue
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[-40:].strip("-")
    tag = f"{slug}-{hashlib.sha1(base.encode()).hexdigest()[:8]}"
    return f"{settings.interactive_queue}.{tag}", f"{settings.bulk_queue}.{tag}"


def segment_queue(settings: Settings, batch_id: str | None, lane: str | None = None) -> str:
    """A job's queue: the lane it was given (its base's queue), else the default base's."""
    if lane:
        return lane
    return settings.bulk_queue if batch_id else settings.interactive_queue


def enqueue_segment(app: Celery, *, job_id: str, queue: str) -> None:
    """Put one job id on the queue; fails fast (about a second) when Redis is down.

    The first message a process sends to a queue goes through Celery's send_task, which declares
    the queue; the rest are LPUSHed straight into its list by `_Pusher`, a fraction of send_task's
    CPU (bench/README.md; it was the single-job create path's largest cost after the database).
    Like the batch path's, those messages carry no task-sent event:
    Flower shows a task from the moment a worker receives it."""
    pusher = _pusher(app)
    if queue not in pusher.declared:
        app.send_task(SEGMENT_TASK, args=[job_id], queue=queue, retry=True, retry_policy=RETRY_POLICY)
        pusher.declared.add(queue)
        return
    pusher.push(SEGMENT_TASK, [job_id], queue)


class _Pusher:
    """One Redis client (and its connection pool) per Celery app for messages pushed directly,
    with the app's broker URL and key prefix, retrying as RETRY_POLICY does."""

    def __init__(self, app: Celery) -> None:
        options = app.conf.broker_transport_options or {}
        self.client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=options.get("socket_timeout", 10),
                                           socket_connect_timeout=options.get("socket_connect_timeout", 3))
        self.prefix = options.get("global_keyprefix", "")
        self.origin = f"{os.getpid()}@{socket.gethostname()}"
        self.reply_to = app.thread_oid
        self.declared: set[str] = set()

    def push(self, task: str, args: list[Any], queue: str) -> None:
        message = _task_message(task, args, queue, origin=self.origin, reply_to=self.reply_to)
        delay, retries = RETRY_POLICY["interval_start"], int(RETRY_POLICY["max_retries"])
        for attempt in range(retries + 1):
            try:
                self.client.lpush(self.prefix + queue, message)
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == retries:
                    raise
                time.sleep(delay)
                delay = min(delay + RETRY_POLICY["interval_step"], RETRY_POLICY["interval_max"])


def _pusher(app: Celery) -> _Pusher:
    pusher: _Pusher | None = getattr(app, "_clipmask_pusher", None)
    if pusher is None:
        pusher = _Pusher(app)
        app._clipmask_pusher = pusher
    return pusher


def enqueue_segments(app: Celery, *, job_ids: list[str], queue: str, chunk: int = 2000) -> None:
    """Many job ids, one message each, LPUSHed through Redis pipelines (one round trip per chunk).

    Celery's send_task costs a fraction of a millisecond a message (plus a task-sent event each),
    seconds for a 10,000-item batch (bench/README.md). The first id goes through send_task,
    which declares the queue as usual;
    the rest are the same protocol-2 messages built here from that shape, without sent events.
    """
    if not job_ids:
        return
    enqueue_segment(app, job_id=job_ids[0], queue=queue)
    origin = f"{os.getpid()}@{socket.gethostname()}"
    reply_to = app.thread_oid
    with app.connection_for_write() as conn:
        client = conn.default_channel.client  # applies the global key prefix, like kombu itself
        for start in range(1, len(job_ids), chunk):
            pipe = client.pipeline(transaction=False)
            for job_id in job_ids[start : start + chunk]:
                pipe.lpush(queue, _task_message(SEGMENT_TASK, [job_id], queue, origin=origin, reply_to=reply_to))
            pipe.execute()


def enqueue_next(app: Celery, *, task: str, args: list[Any], queue: str) -> None:
    """Put one task where the queue's consumers take it next, ahead of what waits there.

    kombu's Redis transport LPUSHes messages and its workers BRPOP them, so an RPUSH of the same
    message is the next one served: a search query (a few milliseconds of model time, with a
    client waiting on it) must not wait behind thousands of queued segmentation jobs."""
    origin = f"{os.getpid()}@{socket.gethostname()}"
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.client.rpush(queue, _task_message(task, args, queue, origin=origin, reply_to=app.thread_oid))


ARGSREPR_MAX = 1024  # as Celery's own argsrepr_maxsize: a repr for Flower and logs, not a second copy


def _task_message(task: str, args: list[Any], queue: str, *, origin: str, reply_to: str) -> str:
    """A Celery protocol-2 message, as kombu's Redis transport stores it."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": repr(args)[:ARGSREPR_MAX], "kwargsrepr": "{}", "origin": origin,
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": reply_to, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


# ---- what the broker holds (for the reconciler) ------------------------------------------------

# kombu's Redis transport: one list per queue and priority step (priority 0 is the plain name),
# and every delivered-but-unacknowledged message in the `unacked` hash as [message, exchange, queue].
PRIORITY_LISTS = ("", *(f"\x06\x16{step}" for step in (3, 6, 9)))
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"  # delivery tag -> when it was delivered (unix seconds)
SCAN_CHUNK = 5000


def segment_job_id(message: dict[str, Any]) -> str | None:
    """The job id a segment-task message carries (protocol 2, base64 JSON body), else None."""
    try:
        if message.get("headers", {}).get("task") != SEGMENT_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class BrokerView:
    """Read-only look at what the Redis broker holds per queue (with the deployment's key prefix).

    An unacknowledged message counts as held only if it was delivered less than `unacked_within_s`
    ago: a worker that died keeps its prefetched messages in `unacked` until the visibility timeout
    (an hour), and their jobs would wait that long; a live worker marks a job running at once.
    """

    def __init__(self, settings: Settings, *, unacked_within_s: float) -> None:
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=3)
        self.prefix = settings.redis_key_prefix
        self.unacked_within_s = unacked_within_s

    def _unacked(self, queue: str) -> list[dict[str, Any]]:
        index: list[tuple[Any, float]] = self.client.zrange(self.prefix + UNACKED_INDEX_KEY, 0, -1,
                                                            withscores=True)  # type: ignore[assignment]
        delivered: dict[Any, float] = dict(index)
        since = time.time() - self.unacked_within_s
        held = []
        for tag, raw in self.client.hgetall(self.prefix + UNACKED_KEY).items():
            if delivered.get(tag, 0.0) < since:
                continue
            try:
                message, _exchange, routing_key = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if routing_key == queue and isinstance(message, dict):
                held.append(message)
        return held

    def close(self) -> None:
        self.client.close()

    def ready(self, queue: str) -> int:
        """Messages waiting in `queue`'s lists for a worker to take them (the dispatcher keeps this low)."""
        return sum(int(n) for n in self._pipe_llen(queue))

    def _pipe_llen(self, queue: str) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for suffix in PRIORITY_LISTS:
            pipe.llen(self.prefix + queue + suffix)
        return pipe.execute()

    def count(self, queue: str) -> int:
        """Messages held for `queue`: ready in its lists, or delivered and not yet acknowledged."""
        ready = sum(int(self.client.llen(self.prefix + queue + suffix)) for suffix in PRIORITY_LISTS)
        return ready + len(self._unacked(queue))

    def job_ids(self, queue: str) -> set[str]:
        """The job ids of every segment message held for `queue` (a full scan, in chunks: use rarely)."""
        messages: list[dict[str, Any]] = self._unacked(queue)
        for suffix in PRIORITY_LISTS:
            key, start = self.prefix + queue + suffix, 0
            while chunk := self.client.lrange(key, start, start + SCAN_CHUNK - 1):
                for raw in chunk:
                    try:
                        messages.append(json.loads(raw))
                    except ValueError:
                        continue
                start += len(chunk)
        return {job_id for message in messages if (job_id := segment_job_id(message))}
