"""The job runner: mark running -> fetch -> decode -> segment -> encode outputs -> store -> record.

A job canceled meanwhile stops at the next stage boundary (after the fetch, after the decode,
before its uploads, which go up together): nothing more is uploaded, and masks this run already
wrote are deleted (a cancel during the uploads is seen by the final commit, which then deletes them).
A job that another run of it finished meanwhile (a lease that expired under a paused worker, and
the reconciler's second run) also stops there, but deletes nothing: the keys are deterministic, so
what this run wrote is what the finished row points at. `_outcome` is the one place that decides.
The boundaries learn of a cancel from Postgres' canceled-jobs channel (worker/stops.py) and ask
the database only about a job they heard of; the final commit, conditional on the job still
running, is what makes a late cancel safe.

A plain function over its collaborators (sessions, storage, segmenter), so it is tested without
a broker. It is idempotent: a redelivered message re-runs a running job to the same object keys
and the same final row, and does nothing for a finished job.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared import jobs as jobstate
from shared.db import session_scope
from shared.enums import JobStatus
from shared.errors import ImageFetchFailed, JobFailure, StorageFailed
from shared.fetch import fetch_image_bytes
from shared.followups import Effects
from shared.images import decode, jpeg_header
from shared.presets import labels_of
from shared.s3uri import input_refusal, parse_s3_uri
from shared.storage import job_object_keys
from shared.tables import Job, Tenant
from worker.conditions import check_boxes, label_conditions, with_learned
from worker.deps import MODEL_INPUT, RunnerDeps, Segments, TransientError
from worker.engine.jpeg import EncodedJpeg
from worker.engine.refine import apply_mattes
from worker.engine.types import SegmentRequest, SegmentResult, Wanted
from worker.outputs import encode_outputs, upload_all, vector_list

log = logging.getLogger(__name__)

def run_job(job_id: str, *, deps: RunnerDeps, retry_storage: bool = False) -> str:
    """Run one job to a final state; returns that state ('skipped' if there was nothing to do).

    JobFailure -> failed with its code; any other exception -> failed with `internal`; a value the
    database refuses to store -> failed (`internal`: the service wrote it); the database unreachable
    -> TransientError (the job stays where it was, the caller retries). Object storage down -> with
    `retry_storage` (retries remain) and attempts left the job goes back to queued and TransientError
    asks for a retry with backoff; on the last attempt it fails `storage_failed`. A job already taken
    `deps.max_attempts` times fails `attempts_exhausted` instead of running again.
    """
    ctx = {"job_id": job_id}
    try:
        with deps.cancels.watching(job_id) if deps.cancels else nullcontext():
            return _take(job_id, deps=deps, ctx=ctx, retry_storage=retry_storage)
    except DBAPIError as exc:
        log.warning("database unavailable; job will be retried", extra=ctx | {"error": str(exc)[:300]})
        raise TransientError(str(exc)) from exc


def is_outage(exc: DBAPIError) -> bool:
    """The database could not be reached or dropped the connection (retry later), as opposed to a
    statement it refused (a value it can't store: retrying gives the same answer)."""
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError | InterfaceError)


def _take(job_id: str, *, deps: RunnerDeps, ctx: dict[str, str], retry_storage: bool) -> str:
    started = time.monotonic()
    exhausted = None
    with session_scope(deps.sessions) as session:
        job = jobstate.mark_running(session, job_id, model_id=deps.model_id, lease_s=deps.lease_s,
                                    model_revision=getattr(deps.segmenter, "loaded_revision", None),
                                    max_attempts=deps.max_attempts)
        started_deliveries = () if job is None else jobstate.started_event(session, job, deps.storage)
        if job is None:  # the rare path: finished, leased elsewhere, or out of attempts
            exhausted = jobstate.mark_exhausted(session, job_id, max_attempts=deps.max_attempts, storage=deps.storage)
    if started_deliveries:
        deps.follow_up(Effects.of(delivery_ids=started_deliveries))
    if exhausted is not None:
        log.warning("job failed: taken %d times without finishing", exhausted.job.attempts,
                    extra=ctx | {"code": "attempts_exhausted"})
        deps.follow_up(Effects.of([exhausted]))
        return _finish(deps, started, JobStatus.FAILED, "attempts_exhausted")
    if job is None:
        log.info("job not runnable (finished, canceled, unknown or leased elsewhere); message dropped",
                 extra=ctx)
        return "skipped"
    ctx["tenant_id"] = job.tenant_id
    if job.batch_id:
        ctx["batch_id"] = job.batch_id
    log.info("job started (attempt %d)", job.attempts, extra=ctx)
    with deps.leases.holding(job.id) if deps.leases else nullcontext():
        return _run(job, deps=deps, ctx=ctx, retry_storage=retry_storage)


class _Stages:
    """Times the stages of one job (a stage may recur, e.g. per mask) and reports the totals."""

    def __init__(self, report: Callable[[str, float], None]) -> None:
        self.report = report
        self.totals: dict[str, float] = {}

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start

    def flush(self) -> None:
        for stage, seconds in self.totals.items():
            self.report(stage, seconds)


def _run(job: Job, *, deps: RunnerDeps, ctx: dict[str, str], retry_storage: bool) -> str:
    started = time.monotonic()
    stages = _Stages(deps.on_stage)
    facts: dict[str, Any] = {}  # what the run learned about the job (the image's size, the model's revision)
    try:
        labels = labels_of(job.labels, list(job.prompts))
        segmenter = deps.segmenter()  # loads the model on the process's first job
        model_input = getattr(segmenter, "input_size", MODEL_INPUT)
        _check_family(job, labels, getattr(segmenter, "family", "clipseg"))
        with stages.time("fetch"):
            data = _fetch(job, deps)
            conditions = label_conditions(labels, job, deps, size=model_input)
            tuned = None if not job.model_ref else deps.decoders.get(
                job.model_ref, job.tenant_id, sessions=deps.sessions, storage=deps.storage,
                base=(deps.model_id, getattr(segmenter, "model_revision", None)))
        conditions = with_learned(labels, conditions, tuned)
        if (stopped := _boundary(deps, job.id)) is not None:
            log.info("job %s during the fetch; stopped before decoding", _why(stopped), extra=ctx)
            return _finish(deps, started, stopped)
        outputs = list(job.outputs_requested or ["mask"])
        refine = job.refine or "none"
        embed = set(job.embed or [])
        with stages.time("decode"):
            # masks come from logits and need only the picture's size; cutouts, overlays and a refine
            # (the photo is the guide) need its pixels, and so do mask embeddings (masked crops)
            host_pixels = bool({"cutout", "overlay"} & set(outputs)) or refine != "none" or "masks" in embed
            image, (width, height) = _decode(data, deps=deps, segmenter=segmenter, host_pixels=host_pixels,
                                             model_input=model_input)
        del data
        # written with the job's final state, in its one transaction (not a round trip of their own)
        check_boxes(labels, width, height)
        facts.update(image_width=width, image_height=height, model_revision=getattr(segmenter, "model_revision", None))
        if (stopped := _boundary(deps, job.id)) is not None:
            log.info("job %s before inference; it takes no batcher slot", _why(stopped), extra=ctx)
            return _finish(deps, started, stopped)
        family = getattr(segmenter, "family", "clipseg")
        components = "instances" in outputs and family == "clipseg"  # found in the soft map (worker/outputs.py)
        wanted = Wanted(soft=bool({"soft", "cutout"} & set(outputs)) or components,
                        label_map=bool({"label_map", "overlay"} & set(outputs)),
                        instances="instances" in outputs and family != "clipseg")
        # each label's own threshold (a preset's calibrated one) unless the job gave one for all
        thresholds = [float(label.get("threshold", job.threshold)) for label in labels]
        threshold: float | list[float] = thresholds if len(set(thresholds)) > 1 else job.threshold
        request = SegmentRequest(image, [label["name"] for label in labels], threshold,
                                 phrasings=conditions, wanted=wanted, size=(width, height),
                                 decoder=None if tuned is None else tuned.decoder,
                                 embed_image="image" in embed, embed_masks="masks" in embed, refine=refine)
        with stages.time("infer"):
            result = segmenter.run(request)
        _check_finite(result)
        if refine == "matting" and wanted.soft:  # on the CPU, in this job's thread: not the device's
            assert not isinstance(image, EncodedJpeg)  # a refined job's image is decoded on the host
            with stages.time("matte"):
                solved = apply_mattes(np.asarray(image), result.masks, max_pixels=deps.matting_max_pixels,
                                      budget=deps.matting_budget)
            log.info("matted %d of %d labels (%d pixels solved)", sum(m.refine == "matting" for m in result.masks),
                     len(result.masks), solved, extra=ctx)
        with stages.time("encode"):
            encoded = encode_outputs(job, labels, outputs, image, result, deps.instances)
        image_embedding = None if result.image_embedding is None else vector_list(result.image_embedding)
        del result
        if encoded.uploads and (stopped := _boundary(deps, job.id)) is not None:
            log.info("job %s before its %d uploads; nothing is uploaded", _why(stopped), len(encoded.uploads),
                     extra=ctx)
            return _finish(deps, started, stopped)
        with stages.time("upload"):  # together; a cancel meanwhile is seen by mark_succeeded below
            upload_all(deps.storage, encoded.uploads)
        with session_scope(deps.sessions) as session:
            done = jobstate.mark_succeeded(session, job.id, results=encoded.results, storage=deps.storage,
                                           output_keys=encoded.output_keys, embedding=image_embedding,
                                           embedding_model=deps.model_id if embed else None, facts=facts)
        stages.flush()
        if done is None:
            stopped = _stopped(deps, job.id) or SUPERSEDED
            log.info("job %s during inference", _why(stopped), extra=ctx)
            if stopped == JobStatus.CANCELED:  # its outputs are discarded
                deps.storage.delete(job_object_keys(encoded.results, encoded.output_keys))
            return _finish(deps, started, stopped)
        log.info("job succeeded", extra=ctx | {"duration_ms": round((time.monotonic() - started) * 1000)})
        deps.follow_up(Effects.of([done]))
        return _finish(deps, started, JobStatus.SUCCEEDED)
    except DBAPIError as exc:
        if is_outage(exc):
            raise
        # a value the database refused (a bug of the service's: the model's output is checked first)
        log.exception("the database refused the job's write", extra=ctx)
        return _fail(job, deps=deps, ctx=ctx, code="internal", message=f"the result could not be recorded: "
                     f"{type(exc.orig).__name__}", started=started, facts=facts)
    except StorageFailed as exc:
        if not retry_storage or job.attempts >= deps.max_attempts:
            return _fail(job, deps=deps, ctx=ctx, code=exc.code, message=exc.message, started=started, facts=facts)
        with session_scope(deps.sessions) as session:
            back = jobstate.requeue(session, job.id)
        log.warning("object storage unavailable; job requeued for a retry", extra=ctx | {"error": exc.message[:300]})
        if back is None:  # canceled or finished meanwhile: nothing to retry
            return _finish(deps, started, _stopped(deps, job.id) or SUPERSEDED)
        raise TransientError(exc.message) from exc
    except JobFailure as exc:
        return _fail(job, deps=deps, ctx=ctx, code=exc.code, message=exc.message, started=started, facts=facts)
    except Exception as exc:  # the one top-level catch: fail the job, keep the worker
        log.exception("job failed with an unexpected error", extra=ctx)
        return _fail(job, deps=deps, ctx=ctx, code="internal", message=f"{type(exc).__name__}: {exc}",
                     started=started, facts=facts)


def _decode(data: bytes, *, deps: RunnerDeps, segmenter: Segments, host_pixels: bool,
            model_input: tuple[int, int]) -> tuple[Image.Image | EncodedJpeg, tuple[int, int]]:
    """The image for the engine and the picture's size. A JPEG the engine decodes with its batch on
    the device has only its header read here; else it is decoded on the host, at a reduced DCT scale
    (never below the model's input) unless the outputs need the full pixels."""
    if not host_pixels and getattr(segmenter, "decodes_jpeg", None):
        header = jpeg_header(data, max_pixels=deps.max_pixels)
        if header is not None:
            return EncodedJpeg(data, header, model_input), header.size
    full_pixels = host_pixels or not deps.reduced_decode
    decoded = decode(data, max_pixels=deps.max_pixels, at_least=None if full_pixels else model_input)
    return decoded.image, decoded.size


def _check_family(job: Job, labels: list[dict[str, Any]], family: str) -> None:
    """A job asking its base's family for what it cannot do fails unsupported_for_model (the API
    refuses it when it knows the base's family; this covers a base no worker had served yet)."""
    from shared.families import unsupported_fields

    refused = unsupported_fields(family, {
        "image_prompts": any(label.get("source") == "image" for label in labels),
        "box_prompts": any(label.get("source") == "box" for label in labels),
        "embed": bool(job.embed)})
    if job.model_ref and family != "clipseg":
        refused.append("model (a fine-tuned decoder)")
    if refused:
        raise JobFailure(f"{', '.join(refused)}: not supported by this job's base ({family})",
                         code="unsupported_for_model")


class ModelOutputInvalid(JobFailure):
    code = "model_output_invalid"


def _check_finite(result: SegmentResult) -> None:
    """A model (a tenant's fine-tuned decoder, say) that gives NaN or infinity fails its job with
    `model_output_invalid`: its masks would be noise, and NaN can't even be stored (jsonb refuses it)."""
    bad = [item.prompt for item in result.masks
           if not (math.isfinite(item.score) and math.isfinite(item.area_fraction))]
    vectors = [result.image_embedding, *(result.mask_embeddings or [])]
    if bad or any(v is not None and not np.isfinite(v).all() for v in vectors):
        where = f" for {', '.join(repr(p[:50]) for p in bad[:3])}" if bad else " in its embeddings"
        raise ModelOutputInvalid(f"the model gave non-finite output (NaN or infinity){where}; its weights are "
                                 "broken or overflow")


def _fetch(job: Job, deps: RunnerDeps) -> bytes:
    """The job's image bytes: its upload, an allowed bucket's object, or its URL."""
    if job.upload_key:
        return deps.storage.get(job.upload_key)
    uri = job.input.get("image_s3_uri")
    if uri is not None:
        bucket, key = parse_s3_uri(uri)
        with deps.sessions() as session:  # checked again: an operator may have closed the bucket since
            tenant = session.get(Tenant, job.tenant_id)
            refusal = input_refusal(bucket, key, tenant_id=job.tenant_id,
                                    allowed=tenant.input_buckets if tenant is not None else None,
                                    own_bucket=deps.storage.bucket)
        if refusal is not None:
            raise ImageFetchFailed(f"checked again when the job ran: {refusal}")
        return deps.storage.read_input(bucket, key, max_bytes=deps.fetch_policy.max_bytes)
    return fetch_image_bytes(job.input["image_url"], deps.fetch_policy).data


# What a run that stops because another run finished (or took back) its job returns: not
# "canceled", which would tell the caller (and the metrics) that a user stopped it.
SUPERSEDED = "superseded"


def _outcome(status: str | None) -> str | None:
    """Why a run must stop, from the job's status now: None while it is running, "canceled" when a
    user (or retention) canceled it, the only case whose uploads are deleted; SUPERSEDED when
    another run of it finished it, or the reconciler requeued it (that run owns the keys now)."""
    if status == JobStatus.RUNNING:
        return None
    if status == JobStatus.CANCELED or status is None:  # a deleted job is as good as canceled
        return JobStatus.CANCELED
    return SUPERSEDED


def _why(stopped: str) -> str:
    return "canceled" if stopped == JobStatus.CANCELED else "finished or taken back by another run"


def _boundary(deps: RunnerDeps, job_id: str) -> str | None:
    """`_stopped` at a stage boundary: without a round trip when the listener heard no cancel of the job.
    (A run another run finished or the reconciler took back is not heard of: its final commit finds out.)"""
    if deps.cancels is not None and not deps.cancels.may_be_canceled(job_id):
        return None
    return _stopped(deps, job_id)


def _stopped(deps: RunnerDeps, job_id: str) -> str | None:
    with deps.sessions() as session:
        return _outcome(jobstate.status_of(session, job_id))


def _finish(deps: RunnerDeps, started: float, status: str, code: str | None = None) -> str:
    deps.on_finish(status, code, time.monotonic() - started)
    return status


def _fail(job: Job, *, deps: RunnerDeps, ctx: dict[str, str], code: str, message: str, started: float,
          facts: dict[str, Any]) -> str:
    with session_scope(deps.sessions) as session:
        failed = jobstate.mark_failed(session, job.id, code=code, message=message, storage=deps.storage, facts=facts)
    if failed is None:
        return _finish(deps, started, _stopped(deps, job.id) or SUPERSEDED)
    log.info("job failed: %s", message, extra=ctx | {"code": code})
    deps.follow_up(Effects.of([failed]))
    return _finish(deps, started, JobStatus.FAILED, code)
