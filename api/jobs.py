"""/v1/jobs: create (JSON or multipart), read, list, cancel. Parse, call the service, respond."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy import select

from api.auth import current_tenant, require_tenant
from api.idempotency import ACCEPTED_HEADERS, fingerprint, idempotency, respond
from api.labels import ImagePrompts, LabelResolver, check_boxes_inside, check_s3_input, job_labels, job_spec
from api.metrics import JOBS_CREATED
from api.openapi import PREFER_APPLIED, Answers, spec
from api.pagination import page
from api.parsing import (
    check_image_bytes,
    decode_base64_image,
    form_fields,
    is_json_request,
    is_multipart_request,
    json_body,
    parse_status,
    refuse_unstorable_ids,
    text_ok,
)
from api.problems import ApiProblem
from api.schemas import (
    FIELD_CODES,
    CreateJobHeaders,
    JobCreateJson,
    JobCreateMultipart,
    JobList,
    JobListQuery,
    JobObject,
    JobParams,
    PreferHeader,
    validation_problem,
)
from api.services import close_db, db, services
from api.waiting import preferred_wait, wait_until
from shared import jobs as jobstate
from shared.db import session_scope
from shared.enums import FINISHED_JOB, JobStatus
from shared.followups import Effects, after_commit
from shared.present import job_object
from shared.submit import Accepted, JobSpec, Submitter
from shared.tables import Job

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("image_url", "image_base64", "image_s3_uri")

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
    sources = [name for name in IMAGE_SOURCES if getattr(parsed, name) is not None]
    if not sources:
        raise ApiProblem(422, "missing_image", "Give the image as image_url, image_base64, image_s3_uri or a "
                         "multipart upload.", errors=[{"field": "image_url", "message": "required"}])
    if len(sources) > 1:
        raise ApiProblem(422, "multiple_images", "Give exactly one of image_url, image_base64 and image_s3_uri.",
                         errors=[{"field": name, "message": "only one image source"} for name in sources])
    params = JobParams.model_validate(parsed.model_dump(exclude=set(IMAGE_SOURCES)))
    shown, examples = ImagePrompts()(params)
    resolve = LabelResolver()
    labels = job_labels(resolve, params, shown)
    extra: dict[str, Any] = {"labels": labels, "image_prompts": shown, "examples": examples,
                             "model_ref": resolve.model(params.model)[0], "base": resolve.base(params.model)[0]}
    if parsed.image_s3_uri is not None:
        check_s3_input(parsed.image_s3_uri, "image_s3_uri")
        return job_spec(params, input={"image_s3_uri": parsed.image_s3_uri}, **extra), fingerprint(body), "s3"
    if parsed.image_base64 is not None:
        data = decode_base64_image(parsed.image_base64)
        check_image_bytes(data, "image_base64")
        check_boxes_inside(params, data)
        return job_spec(params, input={}, image=data, **extra), fingerprint(body), "base64"
    return job_spec(params, input={"image_url": parsed.image_url}, **extra), fingerprint(body), "url"


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
    shown, examples = ImagePrompts()(params)
    resolve = LabelResolver()
    labels = job_labels(resolve, params, shown)
    data = upload.read()
    check_image_bytes(data, "image")
    check_boxes_inside(params, data)
    digest = hashlib.sha256(data).hexdigest()
    job = job_spec(params, labels=labels, input={}, image=data, filename=upload.filename or None,
                   image_prompts=shown, examples=examples, model_ref=resolve.model(params.model)[0],
                   base=resolve.base(params.model)[0])
    return job, fingerprint({**fields, "image": digest}), "upload"


@bp.post("")
@spec.validate(json=JobCreateJson, form=JobCreateMultipart, headers=CreateJobHeaders,
               resp=Answers(202, JobObject, "Accepted; the job is queued (or the replay of a key's first answer).",
                            400, 409, 413, 415, 422, headers={**ACCEPTED_HEADERS, **PREFER_APPLIED},
                            also={201: (JobObject, "With Prefer: wait, the job was created and finished within the "
                                        "wait: the final job.")}),
               operation_id="createJob", tags=["jobs"], skip_validation=True)
def create_job() -> Response:
    """Create a segmentation job

    The image comes as JSON image_url or image_base64, or as the multipart file part `image`.
    `Prefer: wait=N` (1 to 60 s) answers 201 with the final job if it finishes within N seconds,
    else 202 with the job as it stands.
    """
    if is_json_request():
        job, request_hash, source = _parse_json()
    elif is_multipart_request():
        job, request_hash, source = _parse_multipart()
    else:
        raise ApiProblem(415, "unsupported_media_type",
                         "Send application/json or multipart/form-data (file part 'image').")
    wait = preferred_wait(request.headers)
    key = idempotency("jobs.create", request_hash)
    accepted = services().submitter.submit_job(db(), tenant=current_tenant(), spec=job, idempotency=key)
    if accepted.replayed:  # the first answer as it was given; a replay does not wait
        return _replay(accepted)
    JOBS_CREATED.labels(source).inc()
    log.info("job accepted", extra={"job_id": accepted.id, "tenant_id": current_tenant().id})
    if wait is None:
        return respond(accepted)
    with services().finished.admit(current_tenant().id) as admitted:
        if not admitted:  # over the waiters' cap: answered at once, as without Prefer
            return respond(accepted)
        final, job_row = _wait_for(accepted.id, wait)
    if job_row is None:  # deleted meanwhile: the answer given at creation
        return _applied(respond(accepted), wait)
    resp = _job_response(job_row)
    resp.status_code = 201 if final else 202
    resp.headers.update(accepted.headers)
    if final and key is not None:  # a replay answers 201 with the final job too, not the 202 stored first
        with session_scope(services().sessions) as session:
            Submitter.record_answer(session, tenant_id=current_tenant().id, idempotency=key, status_code=201,
                                    body=resp.get_json())
    return _applied(resp, wait)


def _replay(accepted: Accepted) -> Response:
    """A key's first answer again. A 201 held the final job: it is shown as it stands (the same
    job, final, with presigned URLs that have not expired since), or as answered if it was deleted."""
    if accepted.status_code == 201:
        job = jobstate.get_job(db(), accepted.id, tenant_id=current_tenant().id)
        if job is not None:
            resp = _job_response(job)
            resp.status_code = 201
            resp.headers.update(accepted.headers)
            resp.headers["Idempotent-Replayed"] = "true"
            return resp
    return respond(accepted)


def _job_or_404(job_id: str) -> Job:
    job = jobstate.get_job(db(), job_id, tenant_id=current_tenant().id)
    if job is None:
        raise ApiProblem(404, "not_found", f"No job {job_id!r}.")
    return job


def _job_response(job: Job) -> Response:
    return jsonify(job_object(job, services().storage))


def _wait_for(job_id: str, seconds: int) -> tuple[bool, Job | None]:
    """Hold the request until the job is final or `seconds` pass, holding no database connection
    meanwhile; (final?, the job as it stands)."""
    close_db()  # the request's session goes back to the pool while it waits
    svc, tenant_id = services(), current_tenant().id
    seen: list[Job | None] = [None]

    def read() -> bool:
        with svc.sessions() as session:
            job = jobstate.get_job(session, job_id, tenant_id=tenant_id)
            if job is not None:
                session.expunge(job)
        seen[0] = job
        return job is None or job.status in FINISHED_JOB

    final = wait_until(svc.finished, job_id, seconds, read)
    return final and seen[0] is not None, seen[0]


def _applied(resp: Response, wait: int) -> Response:
    resp.headers["Preference-Applied"] = f"wait={wait}"
    resp.vary.add("Prefer")
    return resp


@bp.get("/<job_id>")
@spec.validate(headers=PreferHeader, resp=Answers(200, JobObject, "The job (with Prefer: wait, once final or when "
                                                  "the wait is over).", 404, headers=PREFER_APPLIED),
               operation_id="getJob", tags=["jobs"], skip_validation=True)
def get_job(job_id: str) -> Response:
    """Get a job

    `Prefer: wait=N` (1 to 60 s; plain `wait` is 60) holds the answer until the job is final or N
    seconds pass, and the answer carries `Preference-Applied`.
    """
    job = _job_or_404(job_id)
    wait = preferred_wait(request.headers)
    if wait is None:
        return _job_response(job)
    if job.status not in FINISHED_JOB:
        with services().finished.admit(current_tenant().id) as admitted:
            if not admitted:  # over the waiters' cap: answered at once, as without Prefer
                return _job_response(job)
            _, waited = _wait_for(job_id, wait)
        job = waited or job
    return _applied(_job_response(job), wait)


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
