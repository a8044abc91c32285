"""The job state machine and the public job object.

Every transition is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so a
cancel racing a worker, or a redelivered message racing a finished job, can never move a job
along an edge the contract doesn't have: the loser's UPDATE matches no row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared.models import Job
from shared.storage import ObjectStorage
from shared.webhooks import job_event

NEW_DELIVERIES = "clipmask_new_deliveries"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELED})

# target -> statuses it may be entered from (the contract's only moves)
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    RUNNING: (QUEUED, RUNNING),  # running -> running: a redelivered message re-runs the job
    SUCCEEDED: (RUNNING,),
    FAILED: (QUEUED, RUNNING),  # queued -> failed only for a job that can't even start (row broken)
    CANCELED: (QUEUED, RUNNING),
    QUEUED: (RUNNING,),  # a running job whose worker died is requeued
}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def isoformat(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _transition(session: Session, job_id: str, target: str, *, source: Any = None, **values: Any) -> Job | None:
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


def mark_running(session: Session, job_id: str, *, model_id: str | None, lease_s: float) -> Job | None:
    """queued -> running, or take over a running job whose lease expired (its worker died).

    None when there is nothing to do: the job is finished, gone, or running under a live lease
    elsewhere (a duplicate message), so at most one worker runs a job at a time.
    """
    lease_over = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < func.now())
    return _transition(
        session, job_id, RUNNING, source=or_(Job.status == QUEUED, lease_over),
        started_at=func.coalesce(Job.started_at, func.now()), attempts=Job.attempts + 1, model_id=model_id,
        lease_expires_at=func.now() + dt.timedelta(seconds=lease_s),
    )


def renew_leases(session: Session, job_ids: list[str], *, lease_s: float) -> int:
    """The worker's heartbeat: extend the leases of the running jobs it holds."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.status == RUNNING)
        .values(lease_expires_at=func.now() + dt.timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def record_image_size(session: Session, job_id: str, *, width: int, height: int) -> str | None:
    """Store the decoded size; returns the job's status now (canceled meanwhile?) in the same trip."""
    return session.execute(
        update(Job).where(Job.id == job_id).values(image_width=width, image_height=height)
        .returning(Job.status).execution_options(synchronize_session=False)
    ).scalar_one_or_none()


def _finished(session: Session, job: Job | None, storage: ObjectStorage) -> Job | None:
    """The job reached a final state in this transaction: add its webhook event to it too."""
    if job is not None and job.webhook_url:  # (the body presigns URLs: only build it when needed)
        delivery_id = job_event(session, job, job_object(job, storage, long_urls=True))
        if delivery_id:
            session.info.setdefault(NEW_DELIVERIES, []).append(delivery_id)
    return job


def new_deliveries(session: Session) -> list[str]:
    """Ids of the webhook deliveries this session added (send them once it committed)."""
    return list(session.info.pop(NEW_DELIVERIES, []))


def mark_succeeded(session: Session, job_id: str, *, results: list[dict[str, Any]],
                   storage: ObjectStorage) -> Job | None:
    """running -> succeeded with its results; None when the job was canceled meanwhile."""
    return _finished(session, _transition(session, job_id, SUCCEEDED, results=results, error=None,
                                          finished_at=now(), lease_expires_at=None), storage)


def mark_failed(session: Session, job_id: str, *, code: str, message: str, storage: ObjectStorage) -> Job | None:
    return _finished(session, _transition(
        session, job_id, FAILED, results=[], error={"code": code, "message": message[:1000]}, finished_at=now(),
        lease_expires_at=None,
    ), storage)


def requeue(session: Session, job_id: str) -> Job | None:
    """running -> queued (a retry will run it again); the lease is released."""
    return _transition(session, job_id, QUEUED, lease_expires_at=None, enqueued_at=func.now())


def cancel(session: Session, job_id: str, *, storage: ObjectStorage) -> Job | None:
    return _finished(session, _transition(session, job_id, CANCELED, finished_at=now(), lease_expires_at=None),
                     storage)


def get_job(session: Session, job_id: str, *, tenant_id: str) -> Job | None:
    """The tenant's job; another tenant's job is None, exactly like a missing one."""
    return session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).scalar_one_or_none()


def job_object(job: Job, storage: ObjectStorage, *, long_urls: bool = False) -> dict[str, Any]:
    """The public job object of the contract; mask URLs are presigned now (they expire)."""
    image = None
    if job.image_width is not None and job.image_height is not None:
        image = {"width": job.image_width, "height": job.image_height}
    results = []
    if job.status == SUCCEEDED:
        for item in job.results or []:
            results.append({
                "prompt": item["prompt"],
                "mask_url": storage.presign_get(item["mask_key"], long=long_urls),
                "bbox": item["bbox"],
                "area_fraction": item["area_fraction"],
                "score": item["score"],
            })
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "input": job.input,
        "image": image,
        "prompts": list(job.prompts),
        "threshold": job.threshold,
        "results": results,
        "error": job.error if job.status == FAILED else None,
        "metadata": dict(job.metadata_ or {}),
        "batch_id": job.batch_id,
        "webhook_url": job.webhook_url,
    }
