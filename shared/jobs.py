"""The job state machine.

Every transition is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so a
cancel racing a worker, or a redelivered message racing a finished job, can never move a job
along an edge the contract doesn't have: the loser's UPDATE matches no row.

A transition into a final state returns what it caused, as a `Finished`: the job as it is now
and the webhook deliveries it added in the same transaction. The caller commits, then hands
the effects to `shared.followups.after_commit`, the one place that sends and finalizes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.enums import UNFINISHED_JOB, JobEvent, JobStatus
from shared.models import Embedding, Job
from shared.present import job_object
from shared.storage import ObjectStorage
from shared.webhooks import job_event, wants_event

# target -> statuses it may be entered from (the contract's only moves)
ALLOWED_FROM: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.RUNNING: (JobStatus.QUEUED, JobStatus.RUNNING),  # running -> running: a redelivered message re-runs
    JobStatus.SUCCEEDED: (JobStatus.RUNNING,),
    JobStatus.FAILED: (JobStatus.QUEUED, JobStatus.RUNNING),  # queued -> failed: a job that can't even start
    JobStatus.CANCELED: UNFINISHED_JOB,
    JobStatus.QUEUED: (JobStatus.RUNNING,),  # a running job whose worker died is requeued
}


@dataclass(frozen=True)
class Finished:
    """A job that reached a final state in this transaction, and the deliveries that added."""

    job: Job
    delivery_ids: tuple[str, ...] = ()

    @property
    def batch_id(self) -> str | None:
        return self.job.batch_id


def _transition(session: Session, job_id: str, target: JobStatus, *, source: ColumnElement[bool] | None = None,
                **values: Any) -> Job | None:
    """One conditional UPDATE; `source` narrows the allowed source statuses further."""
    condition = Job.status.in_(ALLOWED_FROM[target])
    stmt = (
        update(Job)
        .where(Job.id == job_id, condition if source is None else and_(condition, source))
        .values(status=target, **values)
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    job = session.execute(stmt).scalar_one_or_none()
    if job is not None:
        session.refresh(job)
    return job


# Postgres NOTIFY channel: the ids of jobs that reached a final state, delivered when their
# transaction commits (api/waiting.py listens, for `Prefer: wait`).
JOB_FINISHED_CHANNEL = "clipmask_job_finished"


def notify_finished(session: Session, job_ids: Sequence[str]) -> None:
    """Announce final jobs to LISTENers, in the caller's transaction (nothing is sent on rollback)."""
    if job_ids:
        session.execute(text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id"),
                        {"channel": JOB_FINISHED_CHANNEL, "ids": list(job_ids)})


def _finished(session: Session, job: Job, storage: ObjectStorage, *, notify: bool = True) -> Finished:
    """The job reached a final state in this transaction: add its webhook event and notification to it."""
    if notify:
        notify_finished(session, [job.id])
    if not job.webhook_url:  # (the body presigns URLs: only build it when needed)
        return Finished(job)
    delivery_id = job_event(session, job, job_object(job, storage, long_urls=True))
    return Finished(job, (delivery_id,) if delivery_id else ())


def mark_running(session: Session, job_id: str, *, model_id: str | None, lease_s: float) -> Job | None:
    """queued -> running, or take over a running job whose lease expired (its worker died).

    None when there is nothing to do: the job is finished, gone, or running under a live lease
    elsewhere (a duplicate message), so at most one worker runs a job at a time.
    """
    lease_over = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < func.now())
    return _transition(
        session, job_id, JobStatus.RUNNING, source=or_(Job.status == JobStatus.QUEUED, lease_over),
        started_at=func.coalesce(Job.started_at, func.now()), attempts=Job.attempts + 1, model_id=model_id,
        lease_expires_at=func.now() + dt.timedelta(seconds=lease_s),
    )


def started_event(session: Session, job: Job, storage: ObjectStorage) -> tuple[str, ...]:
    """The job.started delivery of a job's first run, in mark_running's transaction: a retried job
    (attempts > 1) sends none, so the event goes out once whatever crashes."""
    if job.attempts != 1 or not wants_event(job, JobEvent.STARTED):
        return ()
    delivery_id = job_event(session, job, job_object(job, storage, long_urls=True), JobEvent.STARTED)
    return (delivery_id,) if delivery_id else ()


def record_model(session: Session, job_id: str, *, model_id: str, revision: str | None) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(model_id=model_id, model_revision=revision)
                    .execution_options(synchronize_session=False))


def renew_leases(session: Session, job_ids: list[str], *, lease_s: float) -> int:
    """The worker's heartbeat: extend the leases of the running jobs it holds."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=func.now() + dt.timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def record_image_size(session: Session, job_id: str, *, width: int, height: int) -> str | None:
    """Store the decoded size; returns the job's status now (canceled meanwhile?) in the same trip."""
    return session.execute(
        update(Job).where(Job.id == job_id).values(image_width=width, image_height=height)
        .returning(Job.status).execution_options(synchronize_session=False)
    ).scalar_one_or_none()


def mark_succeeded(session: Session, job_id: str, *, results: list[dict[str, Any]],
                   storage: ObjectStorage, output_keys: dict[str, str] | None = None,
                   embedding: list[float] | None = None, embedding_model: str | None = None) -> Finished | None:
    """running -> succeeded with its results; None when the job was canceled meanwhile. Its
    embeddings (the image's and the results') become searchable in the same transaction."""
    job = _transition(session, job_id, JobStatus.SUCCEEDED, results=results, output_keys=output_keys or {},
                      error=None, finished_at=utcnow(), lease_expires_at=None, embedding=embedding,
                      embedding_model=embedding_model)
    if job is None:
        return None
    if embedding_model is not None:
        store_embeddings(session, job, embedding_model)
    return _finished(session, job, storage)


def store_embeddings(session: Session, job: Job, model: str) -> None:
    """The job's embeddings as rows of `embeddings` (replacing any from an earlier run of it)."""
    session.execute(delete(Embedding).where(Embedding.job_id == job.id))
    rows: list[tuple[int | None, str | None, list[float]]] = []
    if job.embedding is not None:
        rows.append((None, None, job.embedding))
    for index, result in enumerate(job.results or []):
        if result.get("embedding") is not None:
            rows.append((index, result["prompt"], result["embedding"]))
    if rows:
        session.execute(insert(Embedding), [
            {"tenant_id": job.tenant_id, "job_id": job.id, "result_index": index, "batch_id": job.batch_id,
             "prompt": prompt, "metadata_": dict(job.metadata_ or {}), "model": model, "dims": len(vector),
             "embedding": vector} for index, prompt, vector in rows])


def mark_failed(session: Session, job_id: str, *, code: str, message: str,
                storage: ObjectStorage) -> Finished | None:
    job = _transition(session, job_id, JobStatus.FAILED, results=[], error={"code": code, "message": message[:1000]},
                      finished_at=utcnow(), lease_expires_at=None)
    return None if job is None else _finished(session, job, storage)


def requeue(session: Session, job_id: str) -> Job | None:
    """running -> queued (a retry will run it again); the lease is released."""
    return _transition(session, job_id, JobStatus.QUEUED, lease_expires_at=None, enqueued_at=func.now())


def cancel(session: Session, job_id: str, *, storage: ObjectStorage) -> Finished | None:
    """queued|running -> canceled; None when it had already finished."""
    job = _transition(session, job_id, JobStatus.CANCELED, finished_at=utcnow(), lease_expires_at=None)
    return None if job is None else _finished(session, job, storage)


def cancel_batch_jobs(session: Session, *, batch_id: str, tenant_id: str,
                      storage: ObjectStorage) -> list[Finished]:
    """Every unfinished job of a batch -> canceled, in one UPDATE over the same allowed edges."""
    jobs: Sequence[Job] = session.execute(
        update(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant_id,
                          Job.status.in_(ALLOWED_FROM[JobStatus.CANCELED]))
        .values(status=JobStatus.CANCELED, finished_at=func.now(), lease_expires_at=None)
        .returning(Job).execution_options(synchronize_session=False)
    ).scalars().all()
    notify_finished(session, [job.id for job in jobs])  # one statement for the whole batch
    return [_finished(session, job, storage, notify=False) for job in jobs]


def status_of(session: Session, job_id: str) -> str | None:
    """The job's status now (a worker's check between stages: was it canceled meanwhile?)."""
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()


def get_job(session: Session, job_id: str, *, tenant_id: str) -> Job | None:
    """The tenant's job; another tenant's job is None, exactly like a missing one."""
    return session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).scalar_one_or_none()
