"""The Celery application's shared configuration and the producer side (used by the API).

The API only sends task names and job ids; it never imports worker code (no torch there).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from shared.settings import Settings

SEGMENT_TASK = "clipmask.segment"
RETENTION_TASK = "clipmask.retention"
RECONCILE_TASK = "clipmask.reconcile"


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
        task_routes={SEGMENT_TASK: {"queue": settings.interactive_queue}},
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
        },
    )
    return app


def enqueue_segment(app: Celery, *, job_id: str, queue: str) -> None:
    """Put one job id on the queue; fails fast (about a second) when Redis is down."""
    app.send_task(
        SEGMENT_TASK, args=[job_id], queue=queue, retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 1},
    )
