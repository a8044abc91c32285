"""The reconciler: Postgres is the truth, the broker follows it.

Redis may lose messages (it keeps nothing on disk here; FLUSHALL; a crash; the API dying between
its commit and its enqueue), and a worker may die mid-job. Every run:
1. requeues `running` jobs whose lease expired (their worker stopped heartbeating):
   running -> queued, and enqueues the id again;
2. per queue (interactive for single jobs, bulk for batch jobs), re-enqueues only what the broker
   really lost. It compares how many jobs Postgres says wait on the queue with how many messages
   the broker holds for it (ready, or delivered and unacknowledged less than `queued_after` ago:
   a dead worker's prefetched messages sit unacknowledged for an hour). When the broker holds at
   least as many, nothing is done: a long backlog is not a loss, and re-enqueueing it every run
   flooded the queue (200 waiting jobs grew to 324 messages). When it holds fewer, it reads the
   job ids the broker holds and re-enqueues the jobs queued longer than `queued_after` whose id
   is not among them. (Messages of jobs no longer queued can make the count look whole for a
   while; the loss is found once they drain.) A duplicate is still harmless: `mark_running`
   takes a job only when it is queued or its lease expired;
3. asks for `finalize` of batches whose jobs all finished but that were not finalized (the
   request from the last job's worker was lost); finalize is idempotent and exactly-once.
Each step is bounded per run and uses SKIP LOCKED, so several reconcilers never fight.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from celery import Celery
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.batches import stale_batches
from shared.db import session_scope
from shared.enums import JobStatus
from shared.settings import Settings
from shared.tables import Job

log = logging.getLogger(__name__)


class Broker(Protocol):
    def count(self, queue: str) -> int: ...

    def job_ids(self, queue: str) -> set[str]: ...


@dataclass(frozen=True)
class QueueCheck:
    """One queue as both sides see it."""

    queue: str
    queued_in_db: int  # jobs Postgres says wait on this queue
    held_by_broker: int  # messages the broker holds for it, ready or unacknowledged

    @property
    def may_have_lost(self) -> bool:
        return self.held_by_broker < self.queued_in_db


def lost(stale: Iterable[str], held: set[str]) -> list[str]:
    """The stale queued jobs whose id the broker does not hold: those to enqueue again."""
    return [job_id for job_id in stale if job_id not in held]


@dataclass
class ReconcileReport:
    requeued_running: list[str]
    reenqueued_queued: list[str]
    batches: list[str]
    checks: list[QueueCheck]


def reconcile(
    *, sessions: sessionmaker[Session], enqueue: Callable[[str, str | None, str | None], None],
    queued_after: dt.timedelta,
    broker: Broker, queues: dict[str, ColumnElement[bool]], finalize: Callable[[str], None] | None = None,
    batch: int = 1000,
) -> ReconcileReport:
    """One run. `queues` maps each queue name to the condition that selects its jobs; `enqueue`
    takes a job's id, batch and lane."""
    with session_scope(sessions) as session:
        expired = select(Job.id).where(
            Job.status == JobStatus.RUNNING, Job.lease_expires_at < func.now()
        ).limit(batch).with_for_update(skip_locked=True).scalar_subquery()
        requeued = list(session.execute(
            update(Job).where(Job.id.in_(expired), Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, lease_expires_at=None, enqueued_at=func.now())
            .returning(Job.id, Job.batch_id, Job.lane).execution_options(synchronize_session=False)
        ).all())
    for job_id, batch_id, lane in requeued:
        log.warning("requeued a running job whose worker stopped heartbeating", extra={"job_id": job_id})
        enqueue(job_id, batch_id, lane)

    checks, reenqueued = [], []
    for queue, of_queue in queues.items():
        with sessions() as session:
            queued = session.execute(select(func.count()).select_from(Job).where(
                Job.status == JobStatus.QUEUED, of_queue)).scalar_one()
        check = QueueCheck(queue, queued, broker.count(queue) if queued else 0)
        checks.append(check)
        if not check.may_have_lost:
            continue
        held = broker.job_ids(queue)
        with session_scope(sessions) as session:
            stale = session.execute(select(Job.id, Job.batch_id, Job.lane).where(
                Job.status == JobStatus.QUEUED, of_queue,
                func.coalesce(Job.enqueued_at, Job.created_at) < func.now() - queued_after,
            ).limit(batch).with_for_update(skip_locked=True)).all()
            missing = set(lost((job_id for job_id, _, _ in stale), held))
            again = [(job_id, batch_id, lane) for job_id, batch_id, lane in stale if job_id in missing]
            if again:
                session.execute(update(Job).where(Job.id.in_([j for j, _, _ in again])).values(enqueued_at=func.now())
                                .execution_options(synchronize_session=False))
        log.warning("queue %s: %d jobs queued, the broker holds %d messages; %d lost messages re-enqueued",
                    queue, check.queued_in_db, check.held_by_broker, len(again))
        for job_id, batch_id, lane in again:
            enqueue(job_id, batch_id, lane)
        reenqueued += [job_id for job_id, _, _ in again]

    batches = []
    if finalize is not None:
        with sessions() as session:
            batches = stale_batches(session, older_than=dt.timedelta(seconds=5))
        for batch_id in batches:
            log.info("asked to finalize a batch whose jobs all finished", extra={"batch_id": batch_id})
            finalize(batch_id)
    return ReconcileReport([j for j, _, _ in requeued], reenqueued, batches, checks)


def reconcile_from_settings(
    settings: Settings, *, sessions: sessionmaker[Session], celery: Celery, queued_after_s: float | None = None,
) -> ReconcileReport:
    """One reconciler run as configured (beat's task and `clipmask reconcile` both call this)."""
    from shared.queue import FINALIZE_TASK, BrokerView, enqueue_segment, segment_queue
    from shared.tables import ServedBase

    queued_after = settings.reconcile_queued_after_s if queued_after_s is None else queued_after_s
    with sessions() as session:
        bases = [b for b in session.execute(select(ServedBase.id)).scalars() if b != settings.default_base]
    broker = BrokerView(settings, unacked_within_s=queued_after)
    try:
        return reconcile(
            sessions=sessions, batch=settings.reconcile_batch, broker=broker,
            queues=queue_conditions(settings, bases),
            enqueue=lambda job_id, batch_id, lane: enqueue_segment(celery, job_id=job_id,
                                                                   queue=segment_queue(settings, batch_id, lane)),
            finalize=lambda batch_id: celery.send_task(FINALIZE_TASK, args=[batch_id]),
            queued_after=dt.timedelta(seconds=queued_after),
        )
    finally:
        broker.close()  # a run every 30 s: don't leave a connection pool per run to the garbage collector


def queue_conditions(settings: Settings, other_bases: list[str]) -> dict[str, ColumnElement[bool]]:
    """Each queue and the jobs that wait on it: the default base's (jobs without a lane, and batch
    items on its bulk lane), then each other base's lanes."""
    from shared.queue import base_queues

    # batch items the dispatcher sent; those still waiting in Postgres have no message
    sent = Job.batch_id.isnot(None) & Job.dispatched_at.isnot(None)
    queues: dict[str, ColumnElement[bool]] = {
        settings.interactive_queue: Job.batch_id.is_(None) & Job.lane.is_(None),
        settings.bulk_queue: sent & (Job.lane.is_(None) | (Job.lane == settings.bulk_queue)),
    }
    for base in other_bases:
        interactive, bulk = base_queues(settings, base)
        queues[interactive] = Job.batch_id.is_(None) & (Job.lane == interactive)
        queues[bulk] = sent & (Job.lane == bulk)
    return queues
