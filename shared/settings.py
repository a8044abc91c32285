"""One typed settings object, read from the environment (prefix CLIPMASK_) by entry points only.

Modules never read os.environ themselves: `create_app(settings)`, the worker bootstrap and the
CLI build a Settings once and pass it down.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
# Passwords that ship in this repository's defaults and examples: fine on a laptop, never elsewhere.
UNSAFE_PASSWORDS = frozenset({"", "change-me", "change-me-please", "changethis", "admin", "password"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPMASK_", extra="ignore")

    # "development" (the native stack, tests) accepts the repository's default secrets; anything
    # else refuses to start with them (compose runs "production").
    environment: Literal["development", "production"] = "development"

    # --- storage of record and queue -------------------------------------------------------
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/clipmask"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix for every Redis key Celery writes; lets several stacks (or test runs) share a Redis.
    redis_key_prefix: str = ""
    interactive_queue: str = "interactive"
    # Batch items go here, so a big catalog never sits in front of single jobs.
    bulk_queue: str = "bulk"
    # The bulk lane's dispatcher (shared/scheduler.py): `embedded` runs one in every worker process
    # (one leads, the others stand by), `off` leaves it to a `clipmask dispatch` process.
    dispatcher: Literal["embedded", "off"] = "embedded"
    # Ready messages it keeps in the bulk queue: the most a newcomer's first item waits behind (with
    # the workers' prefetched ones); enough that workers never wait on a tick.
    dispatch_depth: int = Field(default=32, ge=1, le=10_000)
    # ...or what the workers take in this many seconds, when that is more (a fast fleet is fed in
    # big ticks; a newcomer still waits about this long behind what is queued, at most)
    dispatch_horizon_s: float = Field(default=0.5, ge=0, le=60)
    dispatch_interval_s: float = Field(default=0.05, gt=0, le=5)  # how often it looks for room
    # Webhook sends and batch finalisation (light work; any worker may take it).
    events_queue: str = "events"

    # --- object storage (S3 protocol) ------------------------------------------------------
    s3_endpoint_url: str | None = None  # None: AWS itself
    # Endpoint written into presigned URLs; set it when clients reach storage by another
    # address than the services do (compose: http://minio:9000 inside, localhost:9000 outside).
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "clipmask"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_create_bucket: bool = True
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 30.0
    s3_max_attempts: int = 4
    # The client of single-object PUTs (masks, uploads): obstore (a Rust S3 client, a fifth of
    # boto3's CPU per PUT, bench/README.md) or boto3; auto: obstore when installed and keys are set
    # (it doesn't read ~/.aws files), else boto3. Everything else goes through boto3.
    s3_put_client: Literal["auto", "obstore", "boto3"] = "auto"
    presign_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Lifetime of URLs frozen into webhook bodies and batch manifests (SigV4's maximum: 7 days)
    result_url_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, le=7 * 24 * 3600)

    # --- limits ------------------------------------------------------------------------------
    max_body_bytes: int = 25 * MIB
    # An answer given before the body was read (413, 401) first reads and discards up to this much
    # of it, so clients that send the whole body before reading (urllib, requests, httpx) see it.
    drain_body_bytes: int = Field(default=256 * MIB, ge=0)
    max_fetch_bytes: int = 25 * MIB
    max_image_pixels: int = 50_000_000
    # refine: matting solves each label's alpha matte on the CPU over the box around its outline; a
    # job's labels are matted in order while their boxes add up to at most this many pixels (about 4 s
    # of one core on the 2-core dev machine, bench/README.md), the rest stay guided
    matting_max_pixels: int = Field(default=4_000_000, ge=0)
    # outputs: instances - the 8-connected components of a label's mask covering at least this share
    # of the image (CLIPSeg's instances), at most max_instances per label, best first
    instances_min_fraction: float = Field(default=0.001, gt=0, lt=1)
    max_instances: int = Field(default=100, ge=1, le=1000)
    # ... and a worker process's job threads solve at most this many pixels at once in all (the solver
    # holds about 400 bytes a pixel: 8M is about 3.2 GB); a matte waits for its pixels
    matting_process_pixels: int = Field(default=8_000_000, ge=1)

    # --- image fetching ----------------------------------------------------------------------
    allow_private_networks: bool = False
    # host:port pairs reachable even when private networks are refused (an internal image
    # server); JSON list in the environment: CLIPMASK_FETCH_ALLOW_ENDPOINTS='["cdn.internal:80"]'
    fetch_allow_endpoints: list[str] = Field(default_factory=list)
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 15.0
    fetch_total_timeout_s: float = 60.0
    fetch_max_redirects: int = 5

    # --- model / engine --------------------------------------------------------------------
    model: str = "CIDAS/clipseg-rd64-refined"  # hub id or local directory: the base a worker serves
    # The deployment's default base (a job without `model`); unset: CLIPMASK_MODEL. A worker serving
    # another base (make up's CLIPMASK_EXTRA_MODELS) keeps it, so that every process names the same
    # queues: the default base's are the plain `interactive` and `bulk`, another base's get a suffix.
    default_model: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # on CUDA
    # on the CPU: auto is bf16 where the CPU multiplies bf16 natively (AVX512-BF16, AMX), else fp32
    cpu_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    engine: Literal["fast", "stock"] = "fast"
    max_batch_images: int = Field(default=16, ge=1, le=1024)
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    text_cache_size: int = Field(default=4096, ge=0)
    torch_compile: bool = False
    # JPEGs of jobs that need no host pixels decoded on the device, a batch at a time (nvJPEG):
    # auto where the device is CUDA and torchvision is installed; on forces it (Pillow in the
    # inference thread where there is no nvJPEG: for tests); off decodes on the host (worker/engine/jpeg.py)
    device_decode: Literal["auto", "on", "off"] = "auto"

    # --- worker ----------------------------------------------------------------------------
    worker_concurrency: int = Field(default=8, ge=1)
    # Celery worker processes per host under `python -m worker.processes` (README "A GPU worker's layout")
    worker_processes: int = Field(default=1, ge=1, le=256)
    job_lease_s: float = Field(default=60, gt=0)  # a running job whose worker is silent this long is requeued
    reconcile_interval_s: float = Field(default=30, gt=0)
    reconcile_queued_after_s: float = Field(default=300, gt=0)  # re-enqueue jobs queued longer than this
    reconcile_batch: int = Field(default=1000, ge=1)
    # a worker that serves a base says so every served_base_beat_s; a base counts as `served` while it
    # did within served_base_live_s, and one no worker served for served_base_ttl_s is no longer
    # listed or accepted (GET /v1/models, a job's `model`)
    served_base_beat_s: float = Field(default=30, gt=0)
    served_base_live_s: float = Field(default=120, gt=0)
    served_base_ttl_s: float = Field(default=86_400, gt=0)
    job_max_retries: int = Field(default=5, ge=0)  # retries of transient failures (database, storage down)
    # a job taken this many times without reaching a final state (its worker died or was killed under
    # it each time, or its results could not be stored) fails `attempts_exhausted`; storage retries count
    job_max_attempts: int = Field(default=3, ge=1, le=100)
    # POST /v1/search waits this long for a worker to embed a text or image query (then 503)
    search_timeout_s: float = Field(default=15.0, gt=0, le=60)
    # HNSW candidates per search (pgvector hnsw.ef_search): more finds more of the true nearest
    # neighbours, slower; recall and latency per value are in bench/README.md (make bench-search)
    search_ef_search: int = Field(default=200, ge=10, le=1000)
    job_retry_backoff_s: float = Field(default=2.0, gt=0)  # first retry delay, doubling each time

    # --- api -------------------------------------------------------------------------------
    idempotency_ttl_s: int = 24 * 3600
    max_batch_items: int = Field(default=100_000, ge=1)
    public_base_url: str = "http://127.0.0.1:8000"
    # Per tenant, every /v1 request: a token bucket refilled at rate_limit_per_s up to
    # rate_limit_burst (0 turns it off). A tenant row may override both.
    rate_limit_per_s: float = Field(default=50, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # A tenant's fine-tuned models (POST /v1/models past it: 409 model_limit_reached)
    max_models_per_tenant: int = Field(default=20, ge=0)
    # A tenant's own presets (POST /v1/presets past it: 409 preset_limit_reached)
    max_presets_per_tenant: int = Field(default=100, ge=0)
    # `Prefer: wait` requests one API process holds at once, and one tenant within it; past either
    # cap a request is answered at once, as without Prefer. Keep the first well under the process's
    # threads (CLIPMASK_API_THREADS, 128), so health checks and other requests always find one.
    wait_max_per_process: int = Field(default=64, ge=0)
    wait_max_per_tenant: int = Field(default=32, ge=0)
    # Jobs a tenant may have waiting (status queued); more are refused with 429 until some ran.
    max_queued_jobs: int = Field(default=200_000, ge=1)
    # How long an API process may answer from its cache of keys and tenants (limits, buckets)
    # without asking Postgres; `clipmask key revoke`, `tenant disable` and `tenant limits` end
    # every cache at once through Redis, so this only bounds changes made to the rows by hand. 0: off.
    auth_cache_s: float = Field(default=30, ge=0)

    # --- operations ------------------------------------------------------------------------
    flower_user: str = "admin"
    flower_password: str = "change-me"
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: no metrics server
    worker_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers
    # --- webhooks ----------------------------------------------------------------------------
    webhook_timeout_s: float = Field(default=15, gt=0)
    # delays before retries 1, 2, ... (the contract's schedule); +-10% jitter is added
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0])
    webhook_dispatch_interval_s: float = Field(default=5, gt=0)
    # How long a delivery being sent is hidden from other dispatchers; past it, one whose sender
    # died is sent again (same webhook-id). Keep it above webhook_timeout_s.
    webhook_claim_s: float = Field(default=120, gt=0)

    retention_days: float = Field(default=30, gt=0)
    retention_interval_s: float = Field(default=3600, gt=0)
    retention_chunk: int = Field(default=500, ge=1, le=10_000)

    @property
    def default_base(self) -> str:
        """The base a job without `model` runs on."""
        return self.default_model or self.model

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment != "development" and self.flower_password in UNSAFE_PASSWORDS:
            raise ValueError(
                "CLIPMASK_FLOWER_PASSWORD is a default or empty; outside development (CLIPMASK_ENVIRONMENT="
                f"{self.environment}) set a password of your own for the Flower dashboard")
        return self
