"""/v1/jobs: create (JSON or multipart), read, list, cancel. Parse, call the service, respond."""

from __future__ import annotations

import hashlib
import logging

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy import select

from api.auth import current_tenant, require_tenant
from api.idempotency import ACCEPTED_HEADERS, fingerprint, idempotency, respond
from api.metrics import JOBS_CREATED
from api.openapi import Answers, spec
from api.pagination import page
from api.parsing import (
    LabelResolver,
    check_image_bytes,
    decode_base64_image,
    form_fields,
    is_json_request,
    is_multipart_request,
    job_spec,
    json_body,
    parse_status,
    refuse_unstorable_ids,
    text_ok,
)
from api.problems import ApiProblem
from api.schemas import (
    FIELD_CODES,
    IdempotencyHeader,
    JobCreateJson,
    JobCreateMultipart,
    JobList,
    JobListQuery,
    JobObject,
    JobParams,
    validation_problem,
)
from api.services import db, services
from shared import jobs as jobstate
from shared.enums import FINISHED_JOB, JobStatus
from shared.followups import Effects, after_commit
from shared.models import Job
from shared.present import job_object
from shared.submit import JobSpec

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)


def _parse_json() -> tuple[JobSpec, str, str]:
    """(spec, request fingerprint, source label) of a JSON body."""
    body = json_body(FIELD_CODES)
    try:
        parsed = JobCreateJson.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc) from exc
    sources = [name for name in ("image_url", "image_base64") if getattr(parsed, name) is not None]
    if not sources:
        raise ApiProblem(422, "missing_image", "Give the image as image_url, image_base64 or a multipart upload.",
                         errors=[{"field": "image_url", "message": "required"}])
    if len(sources) > 1:
        raise ApiProblem(422, "multiple_images", "Give exactly one of image_url and image_base64.",
                         errors=[{"field": name, "message": "only one image source"} for name in sources])
    params = JobParams.model_validate(parsed.model_dump(exclude={"image_url", "image_base64"}))
    labels = LabelResolver()(params.preset, params.prompts)
    if parsed.image_base64 is not None:
        data = decode_base64_image(parsed.image_base64)
        check_image_bytes(data, "image_base64")
        return job_spec(params, labels=labels, input={}, image=data), fingerprint(body), "base64"
    return job_spec(params, labels=labels, input={"image_url": parsed.image_url}), fingerprint(body), "url"


def _parse_multipart() -> tuple[JobSpec, str, str]:
    upload = request.files.get("image")
    if upload is None:
        raise ApiProblem(422, "missing_image", "The multipart body needs a file part named 'image'.",
                         errors=[{"field": "image", "message": "required"}])
    fields = form_fields(request.form, FIELD_CODES)
    if upload.filename and not text_ok(upload.filename):
        raise ApiProblem(422, "invalid_filename", "The image's filename holds a NUL character or a lone surrogate.",
                         errors=[{"field": "image", "message": "filename not storable"}])
    extra_files = [name for name in request.files if name != "image"]
    if extra_files:
        raise ApiProblem(422, "unknown_field", f"Unexpected file parts: {', '.join(extra_files)}.",
                         errors=[{"field": name, "message": "unknown field"} for name in extra_files])
    try:
        params = JobParams.model_validate(fields)
    except ValidationError as exc:
        raise validation_problem(exc) from exc
    labels = LabelResolver()(params.preset, params.prompts)
    data = upload.read()
    check_image_bytes(data, "image")
    digest = hashlib.sha256(data).hexdigest()
    job = job_spec(params, labels=labels, input={}, image=data, filename=upload.filename or None)
    return job, fingerprint({**fields, "image": digest}), "upload"


@bp.post("")
@spec.validate(json=JobCreateJson, form=JobCreateMultipart, headers=IdempotencyHeader,
               resp=Answers(202, JobObject, "Accepted; the job is queued (or the replay of a key's first answer).",
                            400, 409, 413, 415, 422, headers=ACCEPTED_HEADERS),
               operation_id="createJob", tags=["jobs"], skip_validation=True)
def create_job() -> Response:
    """Create a segmentation job

    The image comes as JSON image_url or image_base64, or as the multipart file part `image`.
    """
    if is_json_request():
        job, request_hash, source = _parse_json()
    elif is_multipart_request():
        job, request_hash, source = _parse_multipart()
    else:
        raise ApiProblem(415, "unsupported_media_type",
                         "Send application/json or multipart/form-data (file part 'image').")
    accepted = services().submitter.submit_job(db(), tenant=current_tenant(), spec=job,
                                               idempotency=idempotency("jobs.create", request_hash))
    if not accepted.replayed:
        JOBS_CREATED.labels(source).inc()
        log.info("job accepted", extra={"job_id": accepted.id, "tenant_id": current_tenant().id})
    return respond(accepted)


def _job_or_404(job_id: str) -> Job:
    job = jobstate.get_job(db(), job_id, tenant_id=current_tenant().id)
    if job is None:
        raise ApiProblem(404, "not_found", f"No job {job_id!r}.")
    return job


def _job_response(job: Job) -> Response:
    return jsonify(job_object(job, services().storage))


@bp.get("/<job_id>")
@spec.validate(resp=Answers(200, JobObject, "The job.", 404), operation_id="getJob", tags=["jobs"],
               skip_validation=True)
def get_job(job_id: str) -> Response:
    """Get a job"""
    return _job_response(_job_or_404(job_id))


@bp.get("")
@spec.validate(query=JobListQuery, resp=Answers(200, JobList, "A page of jobs, newest first.", 400, 422),
               operation_id="listJobs", tags=["jobs"], skip_validation=True)
def list_jobs() -> Response:
    """List jobs, newest first"""
    query = select(Job).where(Job.tenant_id == current_tenant().id)
    wanted = parse_status(JobStatus)
    if wanted:
        query = query.where(Job.status.in_(wanted))
    batch_id = request.args.get("batch_id")
    if batch_id:
        query = query.where(Job.batch_id == batch_id)
    storage = services().storage
    return jsonify(page(db(), query, Job, lambda job: job_object(job, storage)))


@bp.post("/<job_id>/cancel")
@spec.validate(resp=Answers(200, JobObject, "The canceled job (canceling a canceled job changes nothing).", 404, 409),
               operation_id="cancelJob", tags=["jobs"], skip_validation=True)
def cancel_job(job_id: str) -> Response:
    """Cancel a queued or running job"""
    svc = services()
    session = db()
    job = _job_or_404(job_id)
    if job.status not in FINISHED_JOB:
        finished = jobstate.cancel(session, job_id, storage=svc.storage)
        session.commit()
        if finished is not None:
            log.info("job canceled", extra={"job_id": job_id, "tenant_id": job.tenant_id})
            after_commit(svc.celery, svc.sessions, Effects.of([finished]))
            job = finished.job
        else:
            session.refresh(job)  # it finished while we looked
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise ApiProblem(409, "job_not_cancelable", f"The job already finished as {job.status}.")
    return _job_response(job)
