"""Retention: delete what is older than a cut-off, in bounded chunks, objects before rows.

In this order: finished jobs (with their upload and mask objects; for a failed or canceled job,
whatever its runs left under its prefix), then webhook deliveries that
are no longer pending, then finished batches none of whose jobs is left (with their manifest).
Objects go first, then rows: a crash in between leaves rows whose objects are gone (the next
run deletes them) rather than objects nobody references. Only finished jobs are deleted; a
job still queued or running after the cut-off is a reconciliation problem, not garbage.

Image-prompt examples sent as base64 are stored once per tenant by content (examples/<tenant>/
<sha256>) and shared by every job that sent the same picture: one goes with the last job that
names it, checked in the transaction that deletes the jobs. A submission writes its examples
before its rows commit, under the tenant's examples lock held shared (shared/submit.py); the
check holds it exclusively, so it sees every job that may name an example it deletes, or the
submission writes the example again after the delete.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.clock import utcnow
from shared.db import session_scope
from shared.enums import FINISHED_JOB, BatchStatus, DeliveryStatus, JobStatus
from shared.settings import Settings
from shared.storage import ObjectStorage, examples_lock, job_object_keys, job_prefix
from shared.tables import Batch, IdempotencyKey, Job, WebhookDelivery

log = logging.getLogger(__name__)


@dataclass
class Purged:
    jobs: int = 0
    deliveries: int = 0
    batches: int = 0
    examples: int = 0


def _example_keys(labels: list[dict[str, Any]] | None) -> set[str]:
    return {label["example"]["key"] for label in labels or []
            if isinstance(label.get("example"), dict) and "key" in label["example"]}


def _unreferenced_examples(session: Session, candidates: set[tuple[str, str]]) -> list[str]:
    """Of (tenant id, example key), the keys that no job row left names (this transaction's deletes
    already gone), under each tenant's examples lock until the transaction ends."""
    for tenant_id in sorted({tenant_id for tenant_id, _ in candidates}):
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(examples_lock(tenant_id)))))
    unused = []
    for tenant_id, key in sorted(candidates):
        named = session.execute(select(exists().where(
            Job.tenant_id == tenant_id,
            text("jobs.labels @> CAST(:pattern AS jsonb)").bindparams(
                pattern=json.dumps([{"example": {"key": key}}]))))).scalar_one()
        if not named:
            unused.append(key)
    return unused


def purge_expired(
    *, sessions: sessionmaker[Session], storage: ObjectStorage, older_than: dt.timedelta, chunk: int = 500,
    idempotency_ttl: dt.timedelta = dt.timedelta(hours=24), max_chunks: int | None = None,
) -> Purged:
    """Delete what was created before now - older_than; returns how many of each were deleted."""
    cutoff = utcnow() - older_than
    purged = Purged()
    chunks = 0
    while max_chunks is None or chunks < max_chunks:
        with session_scope(sessions) as session:
            rows = session.execute(
                select(Job.id, Job.tenant_id, Job.status, Job.upload_key, Job.results, Job.output_keys, Job.labels)
                .where(Job.created_at < cutoff, Job.status.in_(FINISHED_JOB))
                .order_by(Job.created_at)
                .limit(chunk)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                break
            keys = [r.upload_key for r in rows if r.upload_key]
            keys += [key for r in rows for key in job_object_keys(r.results, r.output_keys)]
            # a failed or canceled job records no outputs, but a run of it may have uploaded some before
            # it stopped (uploads that partly failed, a cancel or a kill in between): what is under its
            # prefix goes too. (A succeeded job's runs all wrote the keys its row names.)
            keys += [key for r in rows if r.status in (JobStatus.FAILED, JobStatus.CANCELED)
                     for key in storage.list_keys(job_prefix(tenant_id=r.tenant_id, job_id=r.id))]
            session.execute(delete(Job).where(Job.id.in_([r.id for r in rows])))
            examples = _unreferenced_examples(session, {
                (r.tenant_id, key) for r in rows for key in _example_keys(r.labels)})
            if keys or examples:
                storage.delete(keys + examples)  # before the rows' deletion commits
        purged.jobs += len(rows)
        purged.examples += len(examples)
        chunks += 1
        log.info("retention: deleted %d jobs, %d of their objects and %d image-prompt examples no job names",
                 len(rows), len(keys), len(examples))
    while True:  # deliveries still pending are being retried: they go once they succeeded or failed
        with session_scope(sessions) as session:
            ids = session.execute(
                select(WebhookDelivery.id).where(WebhookDelivery.created_at < cutoff,
                                                 WebhookDelivery.status != DeliveryStatus.PENDING)
                .limit(chunk).with_for_update(skip_locked=True)).scalars().all()
            if ids:
                session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
        purged.deliveries += len(ids)
        if len(ids) < chunk:
            break
    while True:  # a batch goes after its jobs: only when none is left
        with session_scope(sessions) as session:
            batches = session.execute(
                select(Batch.id, Batch.results_key).where(
                    Batch.created_at < cutoff, Batch.status != BatchStatus.RUNNING,
                    ~exists().where(Job.batch_id == Batch.id))
                .limit(chunk).with_for_update(skip_locked=True)).all()
            manifests = [b.results_key for b in batches if b.results_key]
            if manifests:
                storage.delete(manifests)
            if batches:
                session.execute(delete(Batch).where(Batch.id.in_([b.id for b in batches])))
        purged.batches += len(batches)
        if len(batches) < chunk:
            break
    if purged.deliveries or purged.batches:
        log.info("retention: deleted %d webhook deliveries and %d batches", purged.deliveries, purged.batches)
    with session_scope(sessions) as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - idempotency_ttl))
    return purged


def purge_from_settings(
    settings: Settings, *, sessions: sessionmaker[Session], storage: ObjectStorage, days: float | None = None,
) -> Purged:
    """One retention run as configured (beat's task and `clipmask retention` both call this)."""
    return purge_expired(
        sessions=sessions, storage=storage, chunk=settings.retention_chunk,
        older_than=dt.timedelta(days=settings.retention_days if days is None else days),
        idempotency_ttl=dt.timedelta(seconds=settings.idempotency_ttl_s),
    )
