"""Retention: delete finished jobs older than a cut-off, with their objects, in bounded chunks.

Objects go first, then rows: a crash in between leaves rows whose objects are gone (the next
run deletes them) rather than objects nobody references. Only finished jobs are deleted; a
job still queued or running after the cut-off is a reconciliation problem, not garbage.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from shared.clock import utcnow
from shared.db import session_scope
from shared.enums import FINISHED_JOB
from shared.models import IdempotencyKey, Job
from shared.settings import Settings
from shared.storage import ObjectStorage

log = logging.getLogger(__name__)


def purge_expired(
    *, sessions: sessionmaker[Session], storage: ObjectStorage, older_than: dt.timedelta, chunk: int = 500,
    idempotency_ttl: dt.timedelta = dt.timedelta(hours=24), max_chunks: int | None = None,
) -> int:
    """Delete finished jobs created before now - older_than; returns how many were deleted."""
    cutoff = utcnow() - older_than
    deleted = 0
    chunks = 0
    while max_chunks is None or chunks < max_chunks:
        with session_scope(sessions) as session:
            rows = session.execute(
                select(Job.id, Job.upload_key, Job.results)
                .where(Job.created_at < cutoff, Job.status.in_(FINISHED_JOB))
                .order_by(Job.created_at)
                .limit(chunk)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                break
            keys = [r.upload_key for r in rows if r.upload_key]
            keys += [item["mask_key"] for r in rows for item in (r.results or []) if "mask_key" in item]
            if keys:
                storage.delete(keys)
            session.execute(delete(Job).where(Job.id.in_([r.id for r in rows])))
        deleted += len(rows)
        chunks += 1
        log.info("retention: deleted %d jobs and %d objects", len(rows), len(keys))
    with session_scope(sessions) as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - idempotency_ttl))
    return deleted


def purge_from_settings(
    settings: Settings, *, sessions: sessionmaker[Session], storage: ObjectStorage, days: float | None = None,
) -> int:
    """One retention run as configured (beat's task and `clipmask retention` both call this)."""
    return purge_expired(
        sessions=sessions, storage=storage, chunk=settings.retention_chunk,
        older_than=dt.timedelta(days=settings.retention_days if days is None else days),
        idempotency_ttl=dt.timedelta(seconds=settings.idempotency_ttl_s),
    )
