"""/v1/batches: a whole catalog in one request (JSON items, or a JSONL or CSV file part).

Every item is validated before anything is written; the first bad one fails the request with
422 naming its index. Then one transaction writes the batch row and every job row (multi-row
INSERTs), and the job ids go onto the bulk queue through Redis pipelines.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy import delete, select

from api.auth import current_tenant, require_tenant
from api.idempotency import find, fingerprint, replay, request_key
from api.jobs import form_fields, json_body, list_page, parse_limit, parse_status
from api.limits import check_queued_cap
from api.problems import ApiProblem
from api.schemas import BatchCreate, JobParams, check_http_url, validation_problem
from api.services import db, services
from shared import batches as batchstate
from shared import jobs as jobstate
from shared.models import Batch, IdempotencyKey, Job
from shared.queue import after_finish, enqueue_segments

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(require_tenant)

ITEM_FIELDS = ("image_url", "prompts", "threshold", "metadata")


def _item_problem(index: int, field: str, message: str) -> ApiProblem:
    where = f"items[{index}]" + (f".{field}" if field else "")
    return ApiProblem(422, "invalid_batch_item", f"Item {index} is invalid: {field or 'item'}: {message}",
                      errors=[{"field": where, "message": message}])


def _parse_jsonl(text: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _item_problem(len(items), "", f"line {number + 1} is not valid JSON") from exc
    return items


def _parse_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "image_url" not in [f.strip() for f in reader.fieldnames]:
        raise ApiProblem(422, "invalid_items", "The CSV needs a header row with an image_url column.",
                         errors=[{"field": "items", "message": "no image_url column"}])
    items = []
    for row in reader:
        if None in row:  # more cells than header names
            raise _item_problem(len(items), "", "the row has more cells than the header")
        clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        item: dict[str, Any] = {"image_url": clean.pop("image_url")}
        prompts = clean.pop("prompts", "")
        if prompts:
            item["prompts"] = prompts.split("|")
        metadata = {k: v for k, v in clean.items() if k and v}
        if metadata:
            item["metadata"] = metadata
        items.append(item)
    return items


def _parse_file(upload: Any) -> list[Any]:
    raw = upload.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiProblem(422, "invalid_items", "The items file is not UTF-8 text.",
                         errors=[{"field": "items", "message": "not UTF-8"}]) from exc
    name = (upload.filename or "").lower()
    mimetype = (upload.mimetype or "").lower()
    if name.endswith(".csv") or mimetype in ("text/csv", "application/csv"):
        return _parse_csv(text)
    if name.endswith((".jsonl", ".ndjson")) or "ndjson" in mimetype or "jsonl" in mimetype:
        return _parse_jsonl(text)
    return _parse_jsonl(text) if text.lstrip().startswith("{") else _parse_csv(text)


def _parse_request() -> tuple[BatchCreate, list[Any], str]:
    """(batch-level fields, raw items, request fingerprint)."""
    mimetype = request.mimetype or ""
    if mimetype == "application/json" or mimetype.endswith("+json"):
        body = json_body()
        items = body.pop("items", None)
        if not isinstance(items, list):
            raise ApiProblem(422, "invalid_items", "items must be a list of item objects (or upload a file part).",
                             errors=[{"field": "items", "message": "required list"}])
        try:
            fields = BatchCreate.model_validate(body)
        except ValidationError as exc:
            raise validation_problem(exc) from exc
        return fields, items, fingerprint({**body, "items": items})
    if mimetype == "multipart/form-data":
        upload = request.files.get("items")
        if upload is None:
            raise ApiProblem(422, "invalid_items", "The multipart body needs a file part named 'items'.",
                             errors=[{"field": "items", "message": "required"}])
        form = form_fields(request.form)
        try:
            fields = BatchCreate.model_validate(form)
        except ValidationError as exc:
            raise validation_problem(exc) from exc
        data = upload.read()
        upload.stream.seek(0)
        digest = hashlib.sha256(data).hexdigest()
        return fields, _parse_file(upload), fingerprint({**form, "items": digest})
    raise ApiProblem(415, "unsupported_media_type", "Send application/json or multipart/form-data (file part 'items').")


def _validate_items(fields: BatchCreate, raw: list[Any], limit: int) -> list[tuple[str, JobParams]]:
    if not raw:
        raise ApiProblem(422, "invalid_items", "A batch needs at least one item.",
                         errors=[{"field": "items", "message": "empty"}])
    if len(raw) > limit:
        raise ApiProblem(422, "invalid_items", f"A batch holds at most {limit} items, got {len(raw)}.",
                         errors=[{"field": "items", "message": f"more than {limit}"}])
    job_events = None
    if fields.webhook_events is not None:
        job_events = [e for e in fields.webhook_events if e.startswith("job.")]
    out = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _item_problem(index, "", "must be an object")
        unknown = [k for k in item if k not in ITEM_FIELDS]
        if unknown:
            raise _item_problem(index, unknown[0], "unknown field")
        url = item.get("image_url")
        if not isinstance(url, str):
            raise _item_problem(index, "image_url", "required string")
        try:
            url = check_http_url(url)
        except ValueError as exc:
            raise _item_problem(index, "image_url", str(exc)) from exc
        metadata = item.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _item_problem(index, "metadata", "must be an object of strings")
        merged = {
            "prompts": item["prompts"] if item.get("prompts") is not None else fields.prompts,
            "threshold": item["threshold"] if item.get("threshold") is not None else fields.threshold,
            "metadata": {**fields.metadata, **(metadata or {})},
            "webhook_url": fields.webhook_url,
            "webhook_events": job_events,
        }
        if merged["prompts"] is None:
            raise _item_problem(index, "prompts", "required (on the item or the batch)")
        try:
            params = JobParams.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            raise _item_problem(index, field, first["msg"]) from exc
        out.append((url, params))
    return out


@bp.post("")
def create_batch() -> Response:
    svc = services()
    tenant = current_tenant()
    key = request_key()
    fields, raw, request_hash = _parse_request()
    if fields.webhook_url is not None:
        try:
            fields.webhook_url = check_http_url(fields.webhook_url)
        except ValueError as exc:
            raise ApiProblem(422, "invalid_webhook_url", f"webhook_url: {exc}",
                             errors=[{"field": "webhook_url", "message": str(exc)}]) from exc
    session = db()
    if key is not None:
        existing = find(session, tenant_id=tenant.id, key=key, ttl_s=svc.settings.idempotency_ttl_s)
        if existing is not None:
            return replay(existing, route="batches.create", request_hash=request_hash)
    items = _validate_items(fields, raw, svc.settings.max_batch_items)
    check_queued_cap(session, tenant, svc.settings, adding=len(items))

    batch_id = f"batch_{uuid.uuid4().hex}"
    created = jobstate.now()
    batch = Batch(id=batch_id, tenant_id=tenant.id, status=batchstate.RUNNING, created_at=created,
                  total=len(items), metadata_=fields.metadata, webhook_url=fields.webhook_url)
    events = fields.webhook_events
    if fields.webhook_url and events is not None and "batch.completed" not in events:
        batch.webhook_url = None  # only job events were asked for
    job_ids = [str(uuid.uuid4()) for _ in items]
    # created_at steps by a microsecond, so listings and the manifest keep the input order
    rows = [{
        "id": job_id, "tenant_id": tenant.id, "status": jobstate.QUEUED,
        "created_at": created + dt.timedelta(microseconds=index), "input": {"image_url": url},
        "prompts": params.prompts, "threshold": params.threshold, "results": [], "metadata_": params.metadata,
        "batch_id": batch_id, "webhook_url": params.webhook_url, "webhook_events": params.webhook_events,
        "enqueued_at": created, "attempts": 0,
    } for index, (job_id, (url, params)) in enumerate(zip(job_ids, items, strict=True))]
    batchstate.insert_batch(session, batch, rows)
    body = _batch_body(batch)
    location = f"/v1/batches/{batch_id}"
    if key is not None:
        session.add(IdempotencyKey(tenant_id=tenant.id, key=key, route="batches.create", request_hash=request_hash,
                                   status_code=202, response_body=body, headers={"Location": location}))
    session.commit()
    try:
        enqueue_segments(svc.celery, job_ids=job_ids, queue=svc.settings.bulk_queue)
    except Exception as exc:
        log.warning("enqueue failed, withdrawing batch", extra={"batch_id": batch_id, "error": str(exc)})
        session.rollback()
        if key is not None:
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant.id,
                                                         IdempotencyKey.key == key))
        session.execute(delete(Job).where(Job.batch_id == batch_id))
        session.execute(delete(Batch).where(Batch.id == batch_id))
        session.commit()
        raise ApiProblem(503, "dependency_unavailable", "The queue (Redis) is not answering; try again shortly.",
                         headers={"Retry-After": "5"}) from exc
    log.info("batch accepted (%d items)", len(items), extra={"batch_id": batch_id, "tenant_id": tenant.id})
    resp = jsonify(body)
    resp.status_code = 202
    resp.headers["Location"] = location
    return resp


def _batch_body(batch: Batch) -> dict[str, Any]:
    """The object of a batch just created (all queued), without a counting query."""
    counts = {"total": batch.total, **{s: 0 for s in jobstate.STATUSES}, "queued": batch.total}
    return {"id": batch.id, "object": "batch", "status": batch.status, "counts": counts,
            "created_at": jobstate.isoformat(batch.created_at), "finished_at": None, "results_url": None,
            "metadata": dict(batch.metadata_ or {}), "webhook_url": batch.webhook_url}


def _batch_or_404(batch_id: str) -> Batch:
    batch = db().execute(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == current_tenant().id)
                         ).scalar_one_or_none()
    if batch is None:
        raise ApiProblem(404, "not_found", f"No batch {batch_id!r}.")
    return batch


@bp.get("/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return jsonify(batchstate.batch_object(db(), _batch_or_404(batch_id), services().storage))


@bp.get("/<batch_id>/jobs")
def list_batch_jobs(batch_id: str) -> Response:
    batch = _batch_or_404(batch_id)
    query = select(Job).where(Job.tenant_id == batch.tenant_id, Job.batch_id == batch.id)
    wanted = parse_status()
    if wanted:
        query = query.where(Job.status.in_(wanted))
    return jsonify(list_page(query, limit=parse_limit(), cursor=request.args.get("cursor")))


@bp.post("/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    svc = services()
    session = db()
    batch = _batch_or_404(batch_id)
    if batch.status == batchstate.COMPLETED:
        raise ApiProblem(409, "batch_not_cancelable", "The batch already completed.")
    deliveries: list[str] = []
    if batch.status == batchstate.RUNNING:
        deliveries = batchstate.cancel(session, batch, svc.storage)
        session.commit()
        after_finish(svc.celery, svc.sessions, batch_id=batch.id, deliveries=deliveries)
        session.refresh(batch)
    return jsonify(batchstate.batch_object(session, batch, svc.storage))
