"""Database schema (SQLAlchemy 2, typed). Alembic migrations are written against this metadata."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.enums import UNFINISHED_JOB, BatchStatus, DeliveryStatus, JobStatus

JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    webhook_secret: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Per-tenant limits; None: the deployment's defaults (settings rate_limit_*, max_queued_jobs).
    rate_limit_per_s: Mapped[float | None] = mapped_column(Float)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    # the bulk lane's share (shared/scheduler.py): its weight (None: 1) and the cap on its jobs sent
    # to workers and not finished (None: no cap beyond the fleet's)
    weight: Mapped[int | None] = mapped_column(Integer)
    max_running: Mapped[int | None] = mapped_column(Integer)
    # Buckets whose objects this tenant's jobs may read as image_s3_uri; None or []: none.
    input_buckets: Mapped[list[str] | None] = mapped_column(JSONType)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key; keys are 256-bit random tokens, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a key in lists
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # {"image_url": ...} or {"upload": {"filename", "content_type", "bytes"}} as the API shows it
    input: Mapped[dict[str, Any]] = mapped_column(JSONType)
    upload_key: Mapped[str | None] = mapped_column(Text)  # object key of an uploaded/base64 image
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    prompts: Mapped[list[str]] = mapped_column(JSONType)
    threshold: Mapped[float] = mapped_column(Float)
    # [{"prompt", "source", "bbox", "area_fraction", "score", and by outputs "mask_key", "soft_key",
    # "cutout_key", "rle"}]; URLs are presigned at read time
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # What to segment, expanded when the job was created (a later preset edit never changes it):
    # [{"name", "prompts": [phrasings], "source": "preset" | "text"}]; None on jobs older than presets.
    labels: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    preset: Mapped[str | None] = mapped_column(String(64))
    outputs_requested: Mapped[list[str] | None] = mapped_column(JSONType)  # None: ["mask"]
    output_keys: Mapped[dict[str, str] | None] = mapped_column(JSONType)  # {"label_map": key, "overlay": key}
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSONType, default=dict)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    model_id: Mapped[str | None] = mapped_column(Text)
    model_revision: Mapped[str | None] = mapped_column(Text)
    # [{"label", "image_url"} | {"label", "sha256", "bytes", "key"}] as given (base64 examples are
    # stored once per tenant by content hash); their labels are in `labels` with source "image"
    image_prompts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    embed: Mapped[list[str] | None] = mapped_column(JSONType)  # subset of ["image", "masks"]
    embedding: Mapped[list[float] | None] = mapped_column(JSONType)  # the image's, with embed: image
    embedding_model: Mapped[str | None] = mapped_column(Text)
    # the tenant's fine-tuned model asked for, as it was at creation: {"id", "revision"}
    model_ref: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    refine: Mapped[str | None] = mapped_column(String(16))  # none | guided | matting; None: none
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A running job belongs to a worker until this time; the worker's heartbeat extends it.
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When the id was last put on the queue (the reconciler re-enqueues long-queued jobs).
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # a batch item waits in Postgres until the dispatcher sends it to `lane` (its bulk queue):
    # dispatched_at is then set; single jobs are sent at once and keep it null
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    lane: Mapped[str | None] = mapped_column(Text)
    # the base model it runs on, when the job named one other than the default (its lane is that base's)
    base: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")  # the batch's: 0 low, 2 high

    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", created_at.desc(), id.desc()),
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", created_at.desc(), id.desc()),
        Index("ix_jobs_tenant_batch_created", "tenant_id", "batch_id", created_at.desc(), id.desc()),
        Index("ix_jobs_unfinished", "status", "lease_expires_at", postgresql_where=status.in_(UNFINISHED_JOB)),
        Index("ix_jobs_batch_status", "batch_id", "status", postgresql_where=batch_id.isnot(None)),
        Index("ix_jobs_undispatched", "lane", "tenant_id", priority.desc(), "created_at", "id",
              postgresql_where=text("dispatched_at IS NULL AND status = 'queued' AND batch_id IS NOT NULL")),
        Index("ix_jobs_in_flight", "lane", "tenant_id",
              postgresql_where=text("dispatched_at IS NOT NULL AND status IN ('queued', 'running') "
                                    "AND batch_id IS NOT NULL")),
    )


class IdempotencyKey(Base):
    """The first response to a POST with an Idempotency-Key, replayed for 24 hours."""

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSONType)
    headers: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, server_default=func.now()
    )

    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_idempotency_tenant_key"),)


class Batch(Base):
    """A catalog pushed through at once: its jobs carry batch_id; counts come from them."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.RUNNING)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    total: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSONType, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    results_key: Mapped[str | None] = mapped_column(Text)  # the JSONL manifest, once written
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")  # low|normal|high

    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", created_at.desc(), id.desc()),
        Index("ix_batches_running", "status", postgresql_where=status == BatchStatus.RUNNING),
    )


class Preset(Base):
    """A tenant's own label set; the built-in ones live in code (shared/presets.py)."""

    __tablename__ = "presets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)  # [{"name", "prompts": [...]}]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ServedBase(Base):
    """A base checkpoint a worker of this deployment loaded: what a fine-tuned decoder must fit."""

    __tablename__ = "served_bases"

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # as CLIPMASK_MODEL names it
    revision: Mapped[str | None] = mapped_column(Text)
    decoder: Mapped[dict[str, list[int]]] = mapped_column(JSONType)  # "decoder.<name>" -> shape
    projection_dim: Mapped[int] = mapped_column(Integer)
    family: Mapped[str] = mapped_column(Text, default="clipseg", server_default="clipseg")  # shared/families.py
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TunedModel(Base):
    """A tenant's fine-tuned decoder (`clipmask finetune`, `POST /v1/models`); weights in object storage."""

    __tablename__ = "tuned_models"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[str] = mapped_column(String(80))  # sha256 of the weights file
    base_id: Mapped[str] = mapped_column(Text)
    base_revision: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)  # [{"name", "prompts", "threshold"}]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prompt_tuning: Mapped[bool] = mapped_column(Boolean)
    weights_key: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


# HNSW needs a fixed length: the production checkpoint's (CLIPSeg rd64-refined projects to 512).
INDEXED_EMBEDDING_DIMS = 512


class Embedding(Base):
    """A searchable CLIP embedding: a job's image (result_index null) or one label's masked crop.
    Written in the transaction that finishes the job; deleted with it (and with its tenant)."""

    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    result_index: Mapped[int | None] = mapped_column(Integer)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    prompt: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    model: Mapped[str] = mapped_column(Text)
    dims: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[Any] = mapped_column(Vector())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index("ix_embeddings_job", "job_id", "result_index"),
        Index("ix_embeddings_tenant_scope", "tenant_id", "model", "dims", text("(result_index IS NULL)"), "batch_id"),
        Index("ix_embeddings_metadata", "metadata", postgresql_using="gin",
              postgresql_ops={"metadata": "jsonb_path_ops"}),
        # half-precision copies of the vectors, re-ranked exactly by shared/search.py (migration 0009)
        Index(f"ix_embeddings_hnsw_half_{INDEXED_EMBEDDING_DIMS}",
              text(f"(embedding::halfvec({INDEXED_EMBEDDING_DIMS})) halfvec_cosine_ops"), postgresql_using="hnsw",
              postgresql_with={"m": 16, "ef_construction": 128},
              postgresql_where=text(f"dims = {INDEXED_EMBEDDING_DIMS}")),
    )


class WebhookDelivery(Base):
    """One event for one endpoint. The table is the truth: the dispatcher sends what is due here.

    The id is the Standard Webhooks `webhook-id` (stable across retries); `payload` is the exact
    body, frozen when the event happened, so every attempt is byte-identical.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_deliveries_tenant_created", "tenant_id", created_at.desc(), id.desc()),
        Index("ix_deliveries_tenant_job", "tenant_id", "job_id"),
        Index("ix_deliveries_tenant_batch", "tenant_id", "batch_id"),
        Index("ix_deliveries_due", "next_attempt_at", postgresql_where=status == DeliveryStatus.PENDING),
    )
