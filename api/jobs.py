"""/v1/jobs: create (JSON or multipart), read, list, cancel."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy import delete, select, tuple_
from sqlalchemy.exc import IntegrityError

from api.auth import current_tenant, require_tenant
from api.idempotency import find, fingerprint, replay, request_key
from api.limits import check_queued_cap
from api.metrics import JOBS_CREATED
from api.problems import ApiProblem
from api.schemas import JobCreateJson, JobParams, validation_problem
from api.services import db, services
from shared import jobs as jobstate
from shared.images import sniff
from shared.models import IdempotencyKey, Job
from shared.queue import after_finish, enqueue_segment
from shared.storage import upload_key

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(require_tenant)

DATA_URI = re.compile(r"^data:(?P<type>[\w/+.-]*)(;[\w=-]+)*;base64,", re.IGNORECASE)


@dataclass
class NewJobInput:
    params: JobParams
    image_url: str | None
    image_bytes: bytes | None
    filename: str | None
    fingerprint: str
    source: str  # url, base64 or upload (a metrics label)


def json_body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiProblem(400, "malformed_json", "The body is not valid UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise ApiProblem(400, "malformed_json", f"The body is not valid JSON: {exc.msg} at char {exc.pos}.") from exc
    except RecursionError as exc:
        raise ApiProblem(400, "malformed_json", "The JSON body is nested too deeply.") from exc
    if not isinstance(body, dict):
        raise ApiProblem(400, "invalid_body", "The JSON body must be an object.")
    return body


def _decode_base64(text: str) -> bytes:
    match = DATA_URI.match(text)
    payload = text[match.end():] if match else text
    payload = "".join(payload.split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiProblem(
            422, "invalid_image_base64", "image_base64 is not valid base64.",
            errors=[{"field": "image_base64", "message": "not valid base64"}],
        ) from exc


def _check_image_bytes(data: bytes, field: str) -> None:
    if not data:
        raise ApiProblem(422, "empty_image", "The image is empty (0 bytes).",
                         errors=[{"field": field, "message": "empty"}])
    if sniff(data) is None:
        raise ApiProblem(
            415, "unsupported_image_type",
            "The image is not in a format we can read (JPEG, PNG, WebP, GIF, BMP, TIFF and others are).",
            errors=[{"field": field, "message": "not a supported image"}],
        )


def _parse_json() -> NewJobInput:
    body = json_body()
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
    image_bytes = None
    if parsed.image_base64 is not None:
        image_bytes = _decode_base64(parsed.image_base64)
        _check_image_bytes(image_bytes, "image_base64")
    source = "url" if parsed.image_url is not None else "base64"
    return NewJobInput(params, parsed.image_url, image_bytes, None, fingerprint(body), source)


def form_fields(form: Any) -> dict[str, Any]:
    """Multipart form fields as the JSON body would hold them: list fields repeat, metadata is JSON."""
    fields: dict[str, Any] = {}
    for name in form:
        values = form.getlist(name)
        if name in ("prompts", "webhook_events"):
            fields[name] = values
        elif name == "metadata":
            try:
                fields[name] = json.loads(values[-1])
            except json.JSONDecodeError as exc:
                raise ApiProblem(422, "invalid_metadata", "metadata must be a JSON object string.",
                                 errors=[{"field": "metadata", "message": "not valid JSON"}]) from exc
        else:
            fields[name] = values[-1]
    return fields


def _parse_multipart() -> NewJobInput:
    form = request.form
    files = request.files
    upload = files.get("image")
    if upload is None:
        raise ApiProblem(422, "missing_image", "The multipart body needs a file part named 'image'.",
                         errors=[{"field": "image", "message": "required"}])
    fields = form_fields(form)
    extra_files = [name for name in files if name != "image"]
    if extra_files:
        raise ApiProblem(422, "unknown_field", f"Unexpected file parts: {', '.join(extra_files)}.",
                         errors=[{"field": name, "message": "unknown field"} for name in extra_files])
    try:
        params = JobParams.model_validate(fields)
    except ValidationError as exc:
        raise validation_problem(exc) from exc
    data = upload.read()
    _check_image_bytes(data, "image")
    digest = hashlib.sha256(data).hexdigest()
    return NewJobInput(params, None, data, upload.filename or None, fingerprint({**fields, "image": digest}), "upload")


def _parse_create() -> NewJobInput:
    mimetype = request.mimetype or ""
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return _parse_json()
    if mimetype == "multipart/form-data":
        return _parse_multipart()
    raise ApiProblem(415, "unsupported_media_type",
                     "Send application/json or multipart/form-data (file part 'image').")


@bp.post("")
def create_job() -> Response:
    svc = services()
    tenant = current_tenant()
    key = request_key()
    new = _parse_create()
    session = db()
    if key is not None:
        existing = find(session, tenant_id=tenant.id, key=key, ttl_s=svc.settings.idempotency_ttl_s)
        if existing is not None:
            return replay(existing, route="jobs.create", request_hash=new.fingerprint)
    check_queued_cap(session, tenant, svc.settings)
    session.rollback()

    job_id = str(uuid.uuid4())
    stored_key = None
    if new.image_bytes is not None:
        stored_key = upload_key(tenant_id=tenant.id, job_id=job_id)
        content_type = sniff(new.image_bytes) or "application/octet-stream"
        svc.storage.put(stored_key, new.image_bytes, content_type=content_type)
        job_input: dict[str, Any] = {"upload": {
            "filename": new.filename, "content_type": content_type, "bytes": len(new.image_bytes)}}
    else:
        job_input = {"image_url": new.image_url}

    params = new.params
    job = Job(
        id=job_id, tenant_id=tenant.id, status=jobstate.QUEUED, created_at=jobstate.now(), input=job_input,
        upload_key=stored_key, prompts=params.prompts, threshold=params.threshold, results=[],
        metadata_=params.metadata, webhook_url=params.webhook_url, webhook_events=params.webhook_events,
        enqueued_at=jobstate.now(),
    )
    session.add(job)
    session.flush()
    body = jobstate.job_object(job, svc.storage)
    location = f"/v1/jobs/{job_id}"
    if key is not None:
        session.add(IdempotencyKey(
            tenant_id=tenant.id, key=key, route="jobs.create", request_hash=new.fingerprint,
            status_code=202, response_body=body, headers={"Location": location},
        ))
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the race: answer as it did.
        session.rollback()
        if stored_key:
            svc.storage.delete([stored_key])
        existing = find(session, tenant_id=tenant.id, key=key or "", ttl_s=svc.settings.idempotency_ttl_s)
        if existing is None:
            raise
        return replay(existing, route="jobs.create", request_hash=new.fingerprint)

    try:
        enqueue_segment(svc.celery, job_id=job_id, queue=svc.settings.interactive_queue)
    except Exception as exc:
        # Not answered 202, so not accepted: take the job back rather than leave it stranded.
        log.warning("enqueue failed, withdrawing job", extra={"job_id": job_id, "error": str(exc)})
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant.id,
                                                     IdempotencyKey.key == key))
        session.execute(delete(Job).where(Job.id == job_id))
        session.commit()
        if stored_key:
            svc.storage.delete([stored_key])
        raise ApiProblem(503, "dependency_unavailable", "The queue (Redis) is not answering; try again shortly.",
                         headers={"Retry-After": "5"}) from exc
    JOBS_CREATED.labels(new.source).inc()
    log.info("job accepted", extra={"job_id": job_id, "tenant_id": tenant.id})
    resp = jsonify(body)
    resp.status_code = 202
    resp.headers["Location"] = location
    return resp


def _job_or_404(job_id: str) -> Job:
    job = jobstate.get_job(db(), job_id, tenant_id=current_tenant().id)
    if job is None:
        raise ApiProblem(404, "not_found", f"No job {job_id!r}.")
    return job


@bp.get("/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(jobstate.job_object(_job_or_404(job_id), services().storage))


def encode_cursor(row: Any) -> str:
    """An opaque keyset cursor after `row` (anything with created_at and id: jobs, deliveries)."""
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ApiProblem(400, "invalid_cursor", "The cursor is not one this API returned.",
                         errors=[{"field": "cursor", "message": "invalid"}]) from exc


def parse_limit() -> int:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiProblem(422, "invalid_limit", "limit must be an integer from 1 to 100.",
                         errors=[{"field": "limit", "message": "1 to 100"}])
    return int(raw)


def list_page(query: Any, *, limit: int, cursor: str | None) -> dict[str, Any]:
    """One page of jobs, newest first, with an opaque keyset cursor to the next page."""
    if cursor:
        created, last_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, last_id))
    rows = db().execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars().all()
    storage = services().storage
    page = rows[:limit]
    return {
        "object": "list",
        "data": [jobstate.job_object(job, storage) for job in page],
        "next_cursor": encode_cursor(page[-1]) if len(rows) > limit else None,
    }


def parse_status(allowed: tuple[str, ...] = jobstate.STATUSES) -> list[str]:
    """The `status` query parameter: one value or several separated by commas."""
    wanted = [s.strip() for s in request.args.get("status", "").split(",") if s.strip()]
    bad = [s for s in wanted if s not in allowed]
    if bad:
        raise ApiProblem(422, "invalid_status", f"Unknown status {bad[0]!r}; one of {', '.join(allowed)}.",
                         errors=[{"field": "status", "message": "unknown status"}])
    return wanted


@bp.get("")
def list_jobs() -> Response:
    query = select(Job).where(Job.tenant_id == current_tenant().id)
    wanted = parse_status()
    if wanted:
        query = query.where(Job.status.in_(wanted))
    batch_id = request.args.get("batch_id")
    if batch_id:
        query = query.where(Job.batch_id == batch_id)
    return jsonify(list_page(query, limit=parse_limit(), cursor=request.args.get("cursor")))


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    session = db()
    job = _job_or_404(job_id)
    if job.status not in jobstate.FINISHED:
        canceled = jobstate.cancel(session, job_id, storage=services().storage)
        deliveries = jobstate.new_deliveries(session)
        session.commit()
        if canceled is not None:
            log.info("job canceled", extra={"job_id": job_id, "tenant_id": job.tenant_id})
            after_finish(services().celery, services().sessions, batch_id=canceled.batch_id, deliveries=deliveries)
            job = canceled
        else:
            session.refresh(job)  # it finished while we looked
    if job.status in (jobstate.SUCCEEDED, jobstate.FAILED):
        raise ApiProblem(409, "job_not_cancelable", f"The job already finished as {job.status}.")
    return jsonify(jobstate.job_object(job, services().storage))
