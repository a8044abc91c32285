"""The reconciler: Postgres is the truth, the broker follows it.

Redis may lose messages (it keeps nothing on disk here; FLUSHALL; a crash), and a worker may die
mid-job. Every run:
1. requeues `running` jobs whose lease expired (their worker stopped heartbeating):
   running -> queued, and enqueues the id again;
2. re-enqueues `queued` jobs whose id went on the queue longer ago than `queued_after`.
   If the first message still exists, the duplicate is harmless: `mark_running` takes a job only
   when it is queued or its lease expired, and a finished job is skipped. Batch jobs go back to
   the bulk queue, single jobs to the interactive one;
3. asks for `finalize` of batches whose jobs all finished but that were not finalized (the
   request from the last job's worker was lost); finalize is idempotent and exactly-once.
Both are bounded per run and use SKIP LOCKED, so several reconcilers never fight.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.batches import stale_batches
from shared.db import session_scope
from shared.enums import JobStatus
from shared.models import Job
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued_running: list[str]
    reenqueued_queued: list[str]
    batches: list[str]


def reconcile(
    *, sessions: sessionmaker[Session], enqueue: Callable[[str, str | None], None], queued_after: dt.timedelta,
    finalize: Callable[[str], None] | None = None, batch: int = 1000,
) -> ReconcileReport:
    with session_scope(sessions) as session:
        expired = select(Job.id).where(
            Job.status == JobStatus.RUNNING, Job.lease_expires_at < func.now()
        ).limit(batch).with_for_update(skip_locked=True).scalar_subquery()
        requeued = list(session.execute(
            update(Job).where(Job.id.in_(expired), Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, lease_expires_at=None, enqueued_at=func.now())
            .returning(Job.id, Job.batch_id).execution_options(synchronize_session=False)
        ).tuples())
        stale = select(Job.id).where(
            Job.status == JobStatus.QUEUED,
            func.coalesce(Job.enqueued_at, Job.created_at) < func.now() - queued_after,
        ).limit(batch).with_for_update(skip_locked=True).scalar_subquery()
        reenqueued = list(session.execute(
            update(Job).where(Job.id.in_(stale)).values(enqueued_at=func.now())
            .returning(Job.id, Job.batch_id).execution_options(synchronize_session=False)
        ).tuples())
        batches = stale_batches(session, older_than=dt.timedelta(seconds=5)) if finalize else []
    for job_id, batch_id in requeued:
        log.warning("requeued a running job whose worker stopped heartbeating", extra={"job_id": job_id})
        enqueue(job_id, batch_id)
    for job_id, batch_id in reenqueued:
        log.info("re-enqueued a job queued too long (message presumed lost)", extra={"job_id": job_id})
        enqueue(job_id, batch_id)
    for batch_id in batches:
        log.info("asked to finalize a batch whose jobs all finished", extra={"batch_id": batch_id})
        finalize(batch_id)  # type: ignore[misc]
    return ReconcileReport([j for j, _ in requeued], [j for j, _ in reenqueued], batches)


def reconcile_from_settings(
    settings: Settings, *, sessions: sessionmaker[Session], celery: Celery, queued_after_s: float | None = None,
) -> ReconcileReport:
    """One reconciler run as configured (beat's task and `clipmask reconcile` both call this)."""
    from shared.queue import FINALIZE_TASK, enqueue_segment, segment_queue

    return reconcile(
        sessions=sessions, batch=settings.reconcile_batch,
        enqueue=lambda job_id, batch_id: enqueue_segment(celery, job_id=job_id,
                                                         queue=segment_queue(settings, batch_id)),
        finalize=lambda batch_id: celery.send_task(FINALIZE_TASK, args=[batch_id]),
        queued_after=dt.timedelta(seconds=settings.reconcile_queued_after_s if queued_after_s is None
                                  else queued_after_s),
    )
