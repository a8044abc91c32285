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

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import ColumnElement, Update, and_, delete, func, insert, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, make_transient_to_detached

from shared.clock import utcnow
from shared.enums import UNFINISHED_JOB, JobEvent, JobStatus
from shared.present import job_object
from shared.storage import ObjectStorage
from shared.tables import Embedding, Job
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
    stmt = _returning_job(update(Job).where(Job.id == job_id, condition if source is None else and_(condition, source))
                          .values(status=target, **values))
    job: Job | None = session.execute(stmt).scalar_one_or_none()
    return job


def _returning_job(statement: Update) -> Update:
    # the row as RETURNING gave it, also over a copy the session already holds (no second SELECT)
    return statement.returning(Job).execution_options(synchronize_session=False, populate_existing=True)


# Postgres NOTIFY channels, delivered when their transaction commits (shared/listener.py): the ids
# of jobs that reached a final state (api/waiting.py listens, for `Prefer: wait`), and of those
# canceled (workers listen, to stop a run at its next stage boundary: worker/stops.py). The jobs
# table's trigger sends both whenever a job's status becomes final (migration 0010), so no code
# path that finishes a job has to remember to, and its commit needs no statement for it.
JOB_FINISHED_CHANNEL = "clipmask_job_finished"
JOB_CANCELED_CHANNEL = "clipmask_job_canceled"


def _finished(session: Session, job: Job, storage: ObjectStorage) -> Finished:
    """The job reached a final state in this transaction: add its webhook event to it."""
    if not job.webhook_url:  # (the body presigns URLs: only build it when needed)
        return Finished(job)
    delivery_id = job_event(session, job, job_object(job, storage, long_urls=True))
    return Finished(job, (delivery_id,) if delivery_id else ())


# A job is never taken more than this many times when the caller names no cap (tests, benchmarks)
NO_ATTEMPTS_CAP = 2**31 - 1


def mark_running(session: Session, job_id: str, *, model_id: str | None, lease_s: float,
                 model_revision: str | None = None, max_attempts: int = NO_ATTEMPTS_CAP) -> Job | None:
    """queued -> running, or take over a running job whose lease expired (its worker died).

    None when there is nothing to do: the job is finished, gone, running under a live lease
    elsewhere (a duplicate message), so at most one worker runs a job at a time, or already taken
    `max_attempts` times (`mark_exhausted` ends it).
    """
    return _run_transition(session, _RUNNING_SQL, job_id=job_id, model_id=model_id,
                           model_revision=model_revision, lease=dt.timedelta(seconds=lease_s),
                           max_attempts=max_attempts)


def mark_exhausted(session: Session, job_id: str, *, max_attempts: int, storage: ObjectStorage) -> Finished | None:
    """A job that would be taken once more after `max_attempts` takes that never reached a final
    state (its worker died, was killed or wedged each time) -> failed `attempts_exhausted`, so a
    poison job is not run forever. None when that is not the case (the rare path after
    `mark_running` found nothing to take)."""
    job = _run_transition(session, _EXHAUSTED_SQL, job_id=job_id, results=[], max_attempts=max_attempts,
                          error={"code": "attempts_exhausted",
                                 "message": f"the job was taken {max_attempts} times and its worker never finished "
                                            "it (it died, was killed or stopped answering each time); it is not "
                                            "retried again"},
                          finished_at=utcnow(), **_facts(None))
    return None if job is None else _finished(session, job, storage)


# The statements a worker runs for every job (taking it, finishing it) go to the driver as SQL
# written once, and their RETURNING row becomes a Job without the ORM's per-execution work: an
# ORM UPDATE ... RETURNING rebuilt its cache key and loaded its entity on every call. Taking a job
# cost 2.2-3.3 CPU ms that way and 0.8-1.7 this way, finishing it 2.6-3.2 against 0.9-1.5
# (bench/README.md, "The transitions as driver SQL"). The other transitions (cancel, requeue) are
# rare and stay ORM statements (`_transition`).
_JOB_ATTRIBUTES = tuple(sa_inspect(Job).column_attrs)
_JOB_KEYS = tuple(attribute.key for attribute in _JOB_ATTRIBUTES)  # "metadata_" for the column "metadata"
_RETURNING = "RETURNING " + ", ".join(f'"{attribute.columns[0].name}"' for attribute in _JOB_ATTRIBUTES)
_JOB_MANAGER = Job.__mapper__.class_manager


def _statuses(target: JobStatus) -> str:
    return ", ".join(f"'{status.value}'" for status in ALLOWED_FROM[target])


def _kept_unless_sql(column: str) -> str:
    """A bound value, or the column's own value where the bound one is NULL."""
    return f"{column} = coalesce(%({column})s, {column})"


# queued, or running under a lease that expired (its worker is gone)
_TAKEABLE = "(status = 'queued' OR lease_expires_at IS NULL OR lease_expires_at < now())"
_RUNNING_SQL = (
    "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, now()), attempts = attempts + 1,"
    f" model_id = %(model_id)s, {_kept_unless_sql('model_revision')}, lease_expires_at = now() + %(lease)s"
    f" WHERE id = %(job_id)s AND status IN ({_statuses(JobStatus.RUNNING)})"
    f" AND {_TAKEABLE} AND attempts < %(max_attempts)s " + _RETURNING
)

# What a run learned about its job on the way (Job columns): written by the
# transition that finishes it, so a run costs no transaction besides its state changes.
RUN_FACTS = frozenset({"image_width", "image_height", "model_revision"})


def _final_sql(target: JobStatus, condition: str = "") -> str:
    """running -> succeeded, or queued|running -> failed, with what the run learned (RUN_FACTS);
    `condition` narrows the rows further."""
    values = [f"status = '{target.value}'", "results = %(results)s", "error = %(error)s",
              "finished_at = %(finished_at)s", "lease_expires_at = NULL",
              *(_kept_unless_sql(name) for name in sorted(RUN_FACTS))]
    if target == JobStatus.SUCCEEDED:
        values += ["output_keys = %(output_keys)s", "embedding = %(embedding)s",
                   "embedding_model = %(embedding_model)s"]
    return (f"UPDATE jobs SET {', '.join(values)} WHERE id = %(job_id)s AND status IN ({_statuses(target)})"
            f"{condition} {_RETURNING}")


_SUCCEEDED_SQL = _final_sql(JobStatus.SUCCEEDED)
_FAILED_SQL = _final_sql(JobStatus.FAILED)
_EXHAUSTED_SQL = _final_sql(JobStatus.FAILED, f" AND {_TAKEABLE} AND attempts >= %(max_attempts)s")
_JSON_PARAMS = frozenset({"results", "error", "output_keys", "embedding"})  # JSONB columns; None is SQL NULL


def _run_transition(session: Session, sql: str, **params: Any) -> Job | None:
    """One of the worker's per-job statements, in the session's transaction, on the driver's own
    cursor: SQLAlchemy's result for a textual statement described its 33 columns anew on every call,
    half of what was left of the statement's CPU. Errors come out as SQLAlchemy's would: a DBAPIError
    (the runner's "database unavailable, retry"), and a connection that broke is invalidated, so the
    pool never hands it out again."""
    params = {name: Jsonb(value) if name in _JSON_PARAMS and value is not None else value
              for name, value in params.items()}
    connection = session.connection()
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    except psycopg.Error as exc:
        broken = connection.dialect.is_disconnect(exc, connection.connection, cursor)  # type: ignore[arg-type]
        if broken:
            connection.invalidate(exc)
        raise DBAPIError.instance(sql, params, exc, psycopg.Error, connection_invalidated=broken,
                                  dialect=connection.dialect) from exc
    finally:
        cursor.close()
    return None if row is None else _loaded(session, row)


def _loaded(session: Session, row: Sequence[Any]) -> Job:
    """The job as the row has it, detached: reading it costs no query, and adding it to a session is
    an UPDATE, never an INSERT. A copy this session already holds is expired, so it reloads what the
    statement wrote (as populate_existing did for the ORM statement)."""
    job: Job = _JOB_MANAGER.new_instance()
    job.__dict__.update(zip(_JOB_KEYS, row, strict=True))
    make_transient_to_detached(job)
    held = session.identity_map.get(Job.__mapper__.identity_key_from_primary_key((job.id,)))
    if held is not None:
        session.expire(held)
    return job


def started_event(session: Session, job: Job, storage: ObjectStorage) -> tuple[str, ...]:
    """The job.started delivery of a job's first run, in mark_running's transaction: a retried job
    (attempts > 1) sends none, so the event goes out once whatever crashes."""
    if job.attempts != 1 or not wants_event(job, JobEvent.STARTED):
        return ()
    delivery_id = job_event(session, job, job_object(job, storage, long_urls=True), JobEvent.STARTED)
    return (delivery_id,) if delivery_id else ()


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


def _facts(facts: dict[str, Any] | None) -> dict[str, Any]:
    """Every run fact as a parameter (None: the job keeps what it has)."""
    unknown = set(facts or {}) - RUN_FACTS
    if unknown:
        raise ValueError(f"not a run fact: {sorted(unknown)}")
    return {name: (facts or {}).get(name) for name in RUN_FACTS}


def mark_succeeded(session: Session, job_id: str, *, results: list[dict[str, Any]],
                   storage: ObjectStorage, output_keys: dict[str, str] | None = None,
                   embedding: list[float] | None = None, embedding_model: str | None = None,
                   facts: dict[str, Any] | None = None) -> Finished | None:
    """running -> succeeded with its results (and `facts`: the image's size, the model's revision);
    None when the job was canceled meanwhile. Its embeddings (the image's and the results') become
    searchable in the same transaction."""
    job = _run_transition(session, _SUCCEEDED_SQL, job_id=job_id, results=results,
                          output_keys=output_keys or {}, error=None, finished_at=utcnow(), embedding=embedding,
                          embedding_model=embedding_model, **_facts(facts))
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
                storage: ObjectStorage, facts: dict[str, Any] | None = None) -> Finished | None:
    job = _run_transition(session, _FAILED_SQL, job_id=job_id, results=[],
                          error={"code": code, "message": message[:1000]}, finished_at=utcnow(), **_facts(facts))
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
    return [_finished(session, job, storage) for job in jobs]


def status_of(session: Session, job_id: str) -> str | None:
    """The job's status now (a worker's check between stages: was it canceled meanwhile?)."""
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()


def get_job(session: Session, job_id: str, *, tenant_id: str) -> Job | None:
    """The tenant's job; another tenant's job is None, exactly like a missing one."""
    return session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).scalar_one_or_none()
