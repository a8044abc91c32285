"""Batches: many jobs accepted at once, counted from their rows, finished exactly once.

- `insert_batch` writes the batch row and its job rows in bulk (multi-row INSERTs).
- A batch is `running` until none of its jobs is queued or running. Whoever finishes a batch
  job checks that after its commit and asks for `finalize`; the reconciler asks too, so a lost
  request only delays it. `finalize` writes the JSONL manifest (one job object per line, mask
  URLs presigned for the long result lifetime), then flips running -> completed with one
  conditional UPDATE that also requires "no unfinished job"; only the winner adds the
  `batch.completed` delivery, in that same transaction. Exactly once, whoever races.
- `cancel` cancels every unfinished job in one UPDATE (with their job.canceled events) and
  marks the batch canceled; its manifest is written by `finalize` the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import JSON, and_, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from shared import jobs as jobstate
from shared.db import session_scope
from shared.enums import UNFINISHED_JOB, BatchEvent, BatchStatus
from shared.present import batch_counts, batch_object, job_object
from shared.storage import ObjectStorage
from shared.tables import Batch, Job
from shared.webhooks import new_delivery

log = logging.getLogger(__name__)

INSERT_CHUNK = 5000


def manifest_key(*, tenant_id: str, batch_id: str) -> str:
    return f"batches/{tenant_id}/{batch_id}/results.jsonl"


def insert_batch(session: Session, batch: Batch, jobs: list[dict[str, Any]]) -> None:
    """The batch row, then its job rows through COPY on Postgres (one stream, no statement per
    chunk; multi-row INSERTs elsewhere)."""
    session.add(batch)
    session.flush()
    connection = session.connection()
    if connection.dialect.name != "postgresql" or not jobs:
        for start in range(0, len(jobs), INSERT_CHUNK):
            session.execute(insert(Job), jobs[start : start + INSERT_CHUNK])
        return
    from psycopg.types.json import Jsonb

    keys = list(jobs[0])
    columns = [Job.__mapper__.attrs[key].columns[0] for key in keys]
    json_at = [i for i, column in enumerate(columns) if isinstance(column.type.dialect_impl(connection.dialect),
                                                                    JSONB | JSON)]
    names = ", ".join(f'"{column.name}"' for column in columns)
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor, cursor.copy(f"COPY jobs ({names}) FROM STDIN") as copy:
        for job in jobs:
            row = [job[key] for key in keys]
            for i in json_at:
                if row[i] is not None:
                    row[i] = Jsonb(row[i])
            copy.write_row(row)


def counts(session: Session, batch: Batch) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch.id, Job.tenant_id == batch.tenant_id)
        .group_by(Job.status)
    ).all()
    by_status = {status: int(count) for status, count in rows}
    return batch_counts(batch.total, by_status)


def has_unfinished(session: Session, batch_id: str) -> bool:
    return bool(session.execute(
        select(exists().where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED_JOB)))).scalar())


# Jobs read per round trip while a manifest is written: a job with embeddings is up to ~200 KB of
# JSON (32 labels x 512 floats), so a few hundred at a time keep the worker's memory flat.
MANIFEST_ROWS = 200


def manifest_lines(sessions: sessionmaker[Session], storage: ObjectStorage, batch: Batch,
                   *, rows_per_read: int = MANIFEST_ROWS) -> Iterator[bytes]:
    """The batch's job objects, oldest first, as JSONL, a few hundred rows at a time."""
    with sessions() as session:
        rows = session.execute(
            select(Job).where(Job.batch_id == batch.id, Job.tenant_id == batch.tenant_id)
            .order_by(Job.created_at, Job.id).execution_options(yield_per=rows_per_read)
        ).scalars()
        lines: list[bytes] = []
        for job in rows:
            lines.append(json.dumps(job_object(job, storage, long_urls=True), separators=(",", ":")).encode())
            session.expunge(job)  # (nothing of it stays in the session)
            if len(lines) >= rows_per_read:
                yield b"\n".join(lines) + b"\n"
                lines = []
        if lines:
            yield b"\n".join(lines) + b"\n"


def write_manifest(sessions: sessionmaker[Session], storage: ObjectStorage, batch: Batch) -> str:
    """Stream the batch's job objects into one JSONL object (a multipart upload: one part in memory
    at a time, whatever the batch's size); returns its key."""
    key = manifest_key(tenant_id=batch.tenant_id, batch_id=batch.id)
    storage.put_stream(key, manifest_lines(sessions, storage, batch), content_type="application/x-ndjson")
    return key


def finalize(sessions: sessionmaker[Session], storage: ObjectStorage, batch_id: str) -> str | None:
    """Complete a batch whose jobs all finished (or write a canceled one's manifest).

    Returns the id of the batch.completed delivery when this call completed the batch.
    """
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.results_key is not None or has_unfinished(session, batch_id):
            return None
        session.expunge(batch)
    key = write_manifest(sessions, storage, batch)
    with session_scope(sessions) as session:
        if batch.status == BatchStatus.CANCELED:
            session.execute(update(Batch).where(Batch.id == batch_id).values(results_key=key))
            return None
        no_unfinished = ~exists().where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED_JOB))
        done = session.execute(
            update(Batch).where(and_(Batch.id == batch_id, Batch.status == BatchStatus.RUNNING, no_unfinished))
            .values(status=BatchStatus.COMPLETED, finished_at=func.now(), results_key=key)
            .returning(Batch).execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if done is None:
            return None  # someone else completed it, or it was canceled meanwhile
        session.refresh(done)
        log.info("batch completed", extra={"batch_id": batch_id, "tenant_id": done.tenant_id})
        if not done.webhook_url:
            return None
        data = batch_object(done, storage, counts=counts(session, done), long_urls=True)
        delivery = new_delivery(tenant_id=done.tenant_id, event_type=BatchEvent.COMPLETED, url=done.webhook_url,
                                data=data, batch_id=batch_id)
        session.add(delivery)
        return delivery.id


def cancel(session: Session, batch: Batch, storage: ObjectStorage) -> list[jobstate.Finished]:
    """Cancel every unfinished job of the batch (through the job state machine) and the batch itself.

    Returns what the job transitions caused; the caller commits and hands them to `after_commit`,
    which also asks for the canceled batch's manifest.
    """
    finished = jobstate.cancel_batch_jobs(session, batch_id=batch.id, tenant_id=batch.tenant_id, storage=storage)
    session.execute(update(Batch).where(Batch.id == batch.id, Batch.status == BatchStatus.RUNNING)
                    .values(status=BatchStatus.CANCELED, finished_at=func.now()))
    log.info("batch canceled (%d jobs canceled)", len(finished), extra={"batch_id": batch.id,
                                                                         "tenant_id": batch.tenant_id})
    return finished


def stale_batches(session: Session, *, older_than: dt.timedelta, limit: int = 100) -> list[str]:
    """Batches that should be finalized but are not: the reconciler's safety net."""
    no_unfinished = ~exists().where(Job.batch_id == Batch.id, Job.status.in_(UNFINISHED_JOB))
    return list(session.execute(
        select(Batch.id).where(
            Batch.results_key.is_(None), Batch.status.in_([BatchStatus.RUNNING, BatchStatus.CANCELED]),
            no_unfinished, Batch.created_at < func.now() - older_than,
        ).limit(limit)
    ).scalars())
