"""The one way in: idempotency -> queued-jobs cap -> rows -> commit -> enqueue (or withdraw).

`POST /v1/jobs`, `POST /v1/batches` and `clipmask jobs retry` all submit through `Submitter`;
they only parse what they were given into `JobSpec`s. The steps, in this order:
1. An Idempotency-Key seen before replays its first answer (another body: IdempotencyKeyReused).
2. The tenant's cap on queued jobs (QueueFull). A limit of 0 means 0. Near the cap (within
   CAP_SLACK jobs) and for every batch, the count and the insert are serialized per tenant by a
   transaction-scoped advisory lock, so concurrent creates can't pass it together; far from it,
   single jobs skip the lock (over CAP_SLACK creates would have to be in flight at once), and a
   process counts a tenant's queued jobs at most every COUNT_EVERY_S, adding its own creates
   since (the count was a third of a create's database time once thousands wait).
3. Uploads go to object storage, then the rows (job, or batch and jobs) and the key's record are
   written and committed together. If a concurrent request with the same key committed first,
   the unique key makes ours fail: its uploads are deleted and its answer is the winner's.
4. A single job's id goes onto the interactive queue. If that fails, nothing was answered 202,
   so the rows, the key and the uploads are withdrawn and QueueUnavailable is raised: nothing
   accepted is ever stranded. A batch's items are not enqueued: their rows are the bulk lane's
   queue, and the dispatcher (shared/scheduler.py) sends them to workers as slots free, sharing
   the fleet between tenants; a batch is accepted whether or not Redis answers.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.batches import insert_batch
from shared.clock import utcnow
from shared.enums import BatchStatus, JobStatus
from shared.errors import IdempotencyKeyReused, QueueFull, QueueUnavailable
from shared.images import sniff
from shared.present import batch_counts, batch_object, job_object
from shared.presets import expand
from shared.queue import enqueue_segment
from shared.scheduler import PRIORITIES
from shared.settings import Settings
from shared.storage import ObjectStorage, examples_lock, upload_key
from shared.tables import Batch, IdempotencyKey, Job, Tenant

log = logging.getLogger(__name__)

CAP_SLACK = 1000
COUNT_EVERY_S = 0.5  # other processes' creates in that time must stay well under CAP_SLACK


@dataclass(frozen=True)
class SubmitPolicy:
    """The settings the submission service reads (not the whole Settings object)."""

    idempotency_ttl_s: int
    max_queued_jobs: int
    interactive_queue: str
    bulk_queue: str
    # base id -> its (interactive, bulk) queues, for bases other than the default (shared.queue.base_queues)
    queues_of: Callable[[str | None], tuple[str, str]] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SubmitPolicy:
        from shared.queue import base_queues

        return cls(settings.idempotency_ttl_s, settings.max_queued_jobs, settings.interactive_queue,
                   settings.bulk_queue, lambda base: base_queues(settings, base))

    def queues(self, base: str | None) -> tuple[str, str]:
        if base is None or self.queues_of is None:
            return self.interactive_queue, self.bulk_queue
        return self.queues_of(base)


@dataclass(frozen=True)
class JobSpec:
    """One validated job request, whichever route or tool it came from."""

    prompts: list[str]
    threshold: float
    input: dict[str, Any]  # as the API shows it: {"image_url": ...} or {"upload": {...}} (filled in here)
    metadata: dict[str, str] = field(default_factory=dict)
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    image: bytes | None = None  # bytes to store as the job's upload
    filename: str | None = None
    copy_upload_from: str | None = None  # an upload already in storage (a retry): copied there, not re-sent
    labels: list[dict[str, Any]] | None = None  # expanded preset labels and prompts (shared.presets.expand)
    preset: str | None = None
    outputs: list[str] = field(default_factory=lambda: ["mask"])
    # as the job shows them: [{"label", "image_url"} | {"label", "sha256", "bytes", "key"}]
    image_prompts: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, bytes] = field(default_factory=dict)  # base64 image prompts' bytes by object key
    embed: list[str] = field(default_factory=list)
    model_ref: dict[str, str] | None = None  # a tenant's fine-tuned model: {"id", "revision"}
    refine: str = "none"  # none | guided | matting (worker/engine/refine.py)
    base: str | None = None  # the base model it runs on (its queue's); None: the deployment's default

    @classmethod
    def again(cls, job: Job) -> JobSpec:
        """The request a stored job was made from, to submit it again (`clipmask jobs retry`): every
        field Submitter._row stores from a spec, read back; its upload is copied, its examples are
        already stored under the keys its labels name."""
        return cls(prompts=list(job.prompts), threshold=job.threshold, input=dict(job.input),
                   metadata=dict(job.metadata_ or {}), webhook_url=job.webhook_url,
                   webhook_events=None if job.webhook_events is None else list(job.webhook_events),
                   copy_upload_from=job.upload_key, labels=job.labels, preset=job.preset,
                   outputs=list(job.outputs_requested or ["mask"]), image_prompts=list(job.image_prompts or []),
                   embed=list(job.embed or []), model_ref=None if job.model_ref is None else dict(job.model_ref),
                   refine=job.refine or "none", base=job.base)


@dataclass(frozen=True)
class BatchSpec:
    items: list[JobSpec]
    metadata: dict[str, str] = field(default_factory=dict)
    webhook_url: str | None = None  # the batch's own (batch.completed); None when only job events were asked
    priority: str = "normal"  # low | normal | high: the order of this tenant's batches in the bulk lane


@dataclass(frozen=True)
class Idempotency:
    key: str
    route: str  # "jobs.create", "batches.create": a key is per tenant, and used once across routes
    fingerprint: str  # of the request body; the same key with another body is refused


@dataclass(frozen=True)
class Accepted:
    """The answer to a create: 202 with the object, or the replay of the key's first answer."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]
    replayed: bool = False

    @property
    def id(self) -> str:
        return str(self.body["id"])


def replay_answer(session: Session, *, tenant_id: str, idempotency: Idempotency, ttl_s: float) -> Accepted | None:
    """The first answer given to this key, if it is still live; an expired record is deleted. The
    same key with another route or body: IdempotencyKeyReused. (Every create uses it: jobs, batches,
    presets, models.)"""
    row = session.execute(select(IdempotencyKey).where(
        IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == idempotency.key)).scalar_one_or_none()
    if row is None:
        return None
    if row.created_at < utcnow() - dt.timedelta(seconds=ttl_s):
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row.id))
        session.commit()
        return None
    if row.route != idempotency.route or row.request_hash != idempotency.fingerprint:
        raise IdempotencyKeyReused()
    return Accepted(row.status_code, dict(row.response_body), dict(row.headers or {}), replayed=True)


def remember_answer(session: Session, *, tenant_id: str, idempotency: Idempotency, status_code: int,
                    body: dict[str, Any], headers: dict[str, str]) -> None:
    """Keep the answer to replay, in the transaction that creates what it answers (a second request
    with the same key racing this one fails that commit on the key's unique constraint)."""
    session.add(IdempotencyKey(tenant_id=tenant_id, key=idempotency.key, route=idempotency.route,
                               request_hash=idempotency.fingerprint, status_code=status_code,
                               response_body=body, headers=headers))


@dataclass
class _Staged:
    """What a submission wrote before its commit, so it can be answered, enqueued or withdrawn."""

    body: dict[str, Any]
    location: str
    job_ids: list[str]
    queue: str
    batch_id: str | None = None
    upload_keys: list[str] = field(default_factory=list)
    example_keys: set[str] = field(default_factory=set)  # image prompts stored by this submission


def _uploads(spec: JobSpec) -> bool:
    """Whether staging the job writes to object storage (its image or its image prompts)."""
    return spec.image is not None or spec.copy_upload_from is not None or bool(spec.examples)


_JOB_TABLE: Table = Job.__table__  # type: ignore[assignment]
_JOB_INSERT = insert(_JOB_TABLE)
_JOB_COLUMN = {attribute.key: attribute.columns[0].name for attribute in Job.__mapper__.column_attrs}


class Submitter:
    def __init__(self, *, policy: SubmitPolicy, storage: ObjectStorage, celery: Celery) -> None:
        self.policy, self.storage, self.celery = policy, storage, celery
        self._queued: dict[str, tuple[int, float]] = {}  # tenant -> (queued jobs counted + added since, when)

    def submit_job(self, session: Session, *, tenant: Tenant, spec: JobSpec,
                   idempotency: Idempotency | None = None) -> Accepted:
        """Accept one job onto the interactive queue."""
        def stage(session: Session) -> _Staged:
            job_id = str(uuid.uuid4())
            staged = _Staged({}, f"/v1/jobs/{job_id}", [job_id], self.policy.queues(spec.base)[0])
            self._lock_examples(session, tenant, [spec])
            row = self._row(tenant, spec, job_id, utcnow(), staged)
            # one Core INSERT of the row, without the ORM's unit of work (0.94 against 1.13 CPU ms for
            # insert, commit and answer, bench/README.md); the answer is built from a transient Job
            session.connection().execute(_JOB_INSERT, {_JOB_COLUMN[key]: value for key, value in row.items()})
            staged.body = job_object(Job(**row), self.storage)
            return staged

        return self._submit(session, tenant=tenant, idempotency=idempotency, adding=1, stage=stage,
                            uploads=_uploads(spec))

    def submit_batch(self, session: Session, *, tenant: Tenant, spec: BatchSpec,
                     idempotency: Idempotency | None = None) -> Accepted:
        """Accept a batch: one transaction for the batch row and every job row; the dispatcher sends them."""
        def stage(session: Session) -> _Staged:
            batch_id = f"batch_{uuid.uuid4().hex}"
            created = utcnow()
            batch = Batch(id=batch_id, tenant_id=tenant.id, status=BatchStatus.RUNNING, created_at=created,
                          total=len(spec.items), metadata_=spec.metadata, webhook_url=spec.webhook_url,
                          priority=spec.priority)
            job_ids = [str(uuid.uuid4()) for _ in spec.items]
            staged = _Staged({}, f"/v1/batches/{batch_id}", job_ids, self.policy.bulk_queue, batch_id=batch_id)
            self._lock_examples(session, tenant, spec.items)
            # created_at steps by a microsecond, so listings and the manifest keep the input order
            rows = [self._row(tenant, item, job_id, created + dt.timedelta(microseconds=index), staged)
                    for index, (job_id, item) in enumerate(zip(job_ids, spec.items, strict=True))]
            waiting = {"priority": PRIORITIES[spec.priority], "enqueued_at": None}
            for row, item in zip(rows, spec.items, strict=True):  # waiting for the dispatcher: dispatched_at stays null
                row.update(waiting, lane=self.policy.queues(item.base)[1])  # its base's bulk lane
            insert_batch(session, batch, rows)
            counts = batch_counts(batch.total, {JobStatus.QUEUED: batch.total})
            staged.body = batch_object(batch, self.storage, counts=counts)
            return staged

        return self._submit(session, tenant=tenant, idempotency=idempotency, adding=len(spec.items), stage=stage,
                            uploads=any(_uploads(item) for item in spec.items))

    # ---- the steps -------------------------------------------------------------------------------

    @staticmethod
    def _lock_examples(session: Session, tenant: Tenant, specs: list[JobSpec]) -> None:
        """Before writing image-prompt examples: retention deletes an example no committed job names,
        under the same lock held exclusively, so not while this transaction may be about to name it."""
        if any(spec.examples for spec in specs):
            session.execute(select(func.pg_advisory_xact_lock_shared(func.hashtext(examples_lock(tenant.id)))))

    def _row(self, tenant: Tenant, spec: JobSpec, job_id: str, created: dt.datetime,
             staged: _Staged) -> dict[str, Any]:
        job_input, stored_key = spec.input, None
        if spec.image is not None:
            stored_key = upload_key(tenant_id=tenant.id, job_id=job_id)
            content_type = sniff(spec.image) or "application/octet-stream"
            self.storage.put(stored_key, spec.image, content_type=content_type)
            staged.upload_keys.append(stored_key)
            job_input = {"upload": {"filename": spec.filename, "content_type": content_type,
                                    "bytes": len(spec.image)}}
        elif spec.copy_upload_from is not None:  # `input` already describes it
            stored_key = upload_key(tenant_id=tenant.id, job_id=job_id)
            self.storage.copy(spec.copy_upload_from, stored_key)
            staged.upload_keys.append(stored_key)
        for key, data in spec.examples.items():  # content-addressed: shared, never withdrawn
            if key not in staged.example_keys:
                self.storage.put(key, data, content_type=sniff(data) or "application/octet-stream")
                staged.example_keys.add(key)
        return {
            "id": job_id, "tenant_id": tenant.id, "status": JobStatus.QUEUED, "created_at": created,
            "input": job_input, "upload_key": stored_key, "prompts": spec.prompts, "threshold": spec.threshold,
            "results": [], "metadata_": spec.metadata, "batch_id": staged.batch_id, "webhook_url": spec.webhook_url,
            "webhook_events": spec.webhook_events, "enqueued_at": created, "attempts": 0,
            "labels": spec.labels if spec.labels is not None else expand(None, spec.prompts), "preset": spec.preset,
            "outputs_requested": list(spec.outputs), "output_keys": {},
            "image_prompts": spec.image_prompts, "embed": list(spec.embed), "model_ref": spec.model_ref,
            "refine": spec.refine, "base": spec.base,
            # a single job of another base than the default waits on that base's queue
            "lane": staged.queue if staged.batch_id is None and spec.base is not None else None,
        }

    def _submit(self, session: Session, *, tenant: Tenant, idempotency: Idempotency | None, adding: int,
                stage: Callable[[Session], _Staged], uploads: bool) -> Accepted:
        if idempotency is not None:
            replayed = self._replay(session, tenant, idempotency)
            if replayed is not None:
                return replayed
        near_cap = self._check_cap(session, tenant, adding)
        if uploads:
            session.rollback()  # no transaction held open while uploads go to storage
        # else the count and the rows share one transaction: one connection checkout, not two
        if near_cap:
            # held until this transaction commits: the recount sees every create committed before
            session.execute(select(func.pg_advisory_xact_lock(func.hashtext("clipmask.cap:" + tenant.id))))
            self._check_cap(session, tenant, adding)
        staged = stage(session)
        headers = {"Location": staged.location}
        if idempotency is not None:
            remember_answer(session, tenant_id=tenant.id, idempotency=idempotency, status_code=202,
                            body=staged.body, headers=headers)
        try:
            session.commit()
        except IntegrityError:
            # A concurrent request with the same key won the race: answer as it did.
            session.rollback()
            self.storage.delete(staged.upload_keys)
            replayed = self._replay(session, tenant, idempotency) if idempotency is not None else None
            if replayed is None:
                raise
            return replayed
        if staged.batch_id is not None:
            return Accepted(202, staged.body, headers)  # the dispatcher sends its items
        try:
            enqueue_segment(self.celery, job_id=staged.job_ids[0], queue=staged.queue)
        except Exception as exc:
            self._withdraw(session, tenant, idempotency, staged, exc)
            raise QueueUnavailable() from exc
        return Accepted(202, staged.body, headers)

    @staticmethod
    def record_answer(session: Session, *, tenant_id: str, idempotency: Idempotency, status_code: int,
                      body: dict[str, Any]) -> None:
        """The answer finally given when it is not the 202 stored at creation (a create that waited
        and answers 201 with the final job), so that the key's replays answer the same."""
        session.execute(update(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == idempotency.key,
            IdempotencyKey.route == idempotency.route).values(status_code=status_code, response_body=body))

    def _replay(self, session: Session, tenant: Tenant, idempotency: Idempotency) -> Accepted | None:
        return replay_answer(session, tenant_id=tenant.id, idempotency=idempotency,
                             ttl_s=self.policy.idempotency_ttl_s)

    def _check_cap(self, session: Session, tenant: Tenant, adding: int) -> bool:
        """QueueFull if `adding` more would pass the cap; else whether to recheck under the lock."""
        cap = tenant.max_queued_jobs if tenant.max_queued_jobs is not None else self.policy.max_queued_jobs
        now = time.monotonic()
        known = self._queued.get(tenant.id)
        if adding == 1 and known is not None and now - known[1] < COUNT_EVERY_S \
                and known[0] + adding + CAP_SLACK <= cap:
            self._queued[tenant.id] = (known[0] + adding, known[1])  # far from the cap: no count
            return False
        queued = session.execute(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant.id, Job.status == JobStatus.QUEUED)).scalar_one()
        if queued + adding > cap:
            raise QueueFull(queued=queued, cap=cap, adding=adding)
        self._queued[tenant.id] = (queued + adding, now)
        return adding > 1 or queued + adding + CAP_SLACK > cap

    def _withdraw(self, session: Session, tenant: Tenant, idempotency: Idempotency | None, staged: _Staged,
                  exc: Exception) -> None:
        """Enqueueing failed, so nothing was accepted: take back the rows, the key and the uploads."""
        log.warning("enqueue failed, withdrawing the submission",
                    extra={"job_id": staged.job_ids[0] if staged.batch_id is None else None,
                           "batch_id": staged.batch_id, "tenant_id": tenant.id, "error": str(exc)})
        session.rollback()
        if idempotency is not None:
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant.id,
                                                         IdempotencyKey.key == idempotency.key))
        if staged.batch_id is not None:
            session.execute(delete(Job).where(Job.batch_id == staged.batch_id))
            session.execute(delete(Batch).where(Batch.id == staged.batch_id))
        else:
            session.execute(delete(Job).where(Job.id.in_(staged.job_ids)))
        session.commit()
        self.storage.delete(staged.upload_keys)
