"""/v1/batches: a whole catalog in one request (JSON items, or a JSONL or CSV file part).

Every item is validated before anything is written; the first bad one fails the request with
422 naming its index. Then one transaction writes the batch row and every job row (multi-row
INSERTs). Nothing goes onto a queue: the bulk lane's dispatcher (shared/scheduler.py) sends the
items to workers as slots free, sharing them between tenants.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy import select
from werkzeug.datastructures import FileStorage

from api.auth import current_tenant, require_tenant
from api.idempotency import ACCEPTED_HEADERS, fingerprint, idempotency, respond
from api.labels import ImagePrompts, LabelResolver, check_s3_input, job_labels, job_spec
from api.openapi import Answers, spec
from api.pagination import page
from api.parsing import (
    form_fields,
    is_json_request,
    is_multipart_request,
    json_body,
    loads,
    parse_status,
    refuse_unstorable,
    refuse_unstorable_ids,
)
from api.problems import ApiProblem
from api.schemas import (
    FIELD_CODES,
    BatchCreate,
    BatchCreateMultipart,
    BatchJobsQuery,
    BatchObject,
    IdempotencyHeader,
    JobList,
    JobParams,
    check_http_url,
    check_metadata,
    validation_problem,
)
from api.services import db, services
from shared import batches as batchstate
from shared import presets, tuned_models
from shared.enums import BatchEvent, BatchStatus, JobEvent, JobStatus
from shared.followups import Effects, after_commit
from shared.present import batch_object, job_object
from shared.submit import BatchSpec, JobSpec
from shared.tables import Batch, Job

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)

FAST_ITEM_FIELDS = frozenset({"image_url", "image_s3_uri", "metadata"})
ITEM_FIELDS = ("image_url", "image_s3_uri", "prompts", "threshold", "metadata", "preset", "outputs", "image_prompts",
               "box_prompts", "embed", "model", "refine")
BATCH_CODES = {**FIELD_CODES, "items": "invalid_batch_item"}


def _item_problem(index: int, field: str, message: str) -> ApiProblem:
    where = f"items[{index}]" + (f".{field}" if field else "")
    return ApiProblem(422, "invalid_batch_item", f"Item {index} is invalid: {field or 'item'}: {message}",
                      errors=[{"field": where, "message": message}])


def _parse_jsonl(text: str) -> list[Any]:
    items: list[Any] = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            items.append(loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _item_problem(len(items), "", f"line {number + 1} is not valid JSON") from exc
    return items


def _parse_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted fields may hold line breaks
    try:
        names = [f.strip() for f in reader.fieldnames or []]
        if "image_url" not in names and "image_s3_uri" not in names:
            raise ApiProblem(422, "invalid_items", "The CSV needs a header row with an image_url (or image_s3_uri) "
                             "column.", errors=[{"field": "items", "message": "no image_url column"}])
        items: list[dict[str, Any]] = []
        for row in reader:
            if None in row:  # more cells than header names
                raise _item_problem(len(items), "", "the row has more cells than the header")
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            item: dict[str, Any] = {name: clean.pop(name) for name in ("image_url", "image_s3_uri") if name in clean}
            for name in ("prompts", "outputs", "embed"):  # list columns, values separated by |
                value = clean.pop(name, "")
                if value:
                    item[name] = value.split("|")
            for name in ("preset", "refine"):
                value = clean.pop(name, "")
                if value:
                    item[name] = value
            metadata = {k: v for k, v in clean.items() if k and v}
            if metadata:
                item["metadata"] = metadata
            items.append(item)
        return items
    except csv.Error as exc:  # a field over csv's size limit, say
        line = reader.line_num + 1  # the line being read when it failed
        raise ApiProblem(422, "invalid_items", f"The CSV is malformed at line {line}: {exc}",
                         errors=[{"field": "items", "message": f"line {line}: {exc}"}]) from exc


def _parse_file(upload: FileStorage) -> list[Any]:
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
    if is_json_request():
        body = json_body(BATCH_CODES)
        items = body.pop("items", None)
        if not isinstance(items, list):
            raise ApiProblem(422, "invalid_items", "items must be a list of item objects (or upload a file part).",
                             errors=[{"field": "items", "message": "required list"}])
        try:
            fields = BatchCreate.model_validate(body)
        except ValidationError as exc:
            raise validation_problem(exc) from exc
        return fields, items, fingerprint({**body, "items": items})
    if is_multipart_request():
        upload = request.files.get("items")
        if upload is None:
            raise ApiProblem(422, "invalid_items", "The multipart body needs a file part named 'items'.",
                             errors=[{"field": "items", "message": "required"}])
        form = form_fields(request.form, BATCH_CODES)
        try:
            fields = BatchCreate.model_validate(form)
        except ValidationError as exc:
            raise validation_problem(exc) from exc
        data = upload.read()
        upload.stream.seek(0)
        digest = hashlib.sha256(data).hexdigest()
        items = _parse_file(upload)
        refuse_unstorable(items, BATCH_CODES, prefix="items")
        return fields, items, fingerprint({**form, "items": digest})
    raise ApiProblem(415, "unsupported_media_type", "Send application/json or multipart/form-data (file part 'items').")


def _validate_items(fields: BatchCreate, raw: list[Any], limit: int) -> BatchSpec:
    """Every item, validated and merged over the batch's defaults, before anything is written."""
    if not raw:
        raise ApiProblem(422, "invalid_items", "A batch needs at least one item.",
                         errors=[{"field": "items", "message": "empty"}])
    if len(raw) > limit:
        raise ApiProblem(422, "invalid_items", f"A batch holds at most {limit} items, got {len(raw)}.",
                         errors=[{"field": "items", "message": f"more than {limit}"}])
    events = fields.webhook_events
    job_events = None if events is None else [e for e in events if isinstance(e, JobEvent)]
    resolve, examples = LabelResolver(), ImagePrompts()
    batch_image_prompts = (None if fields.image_prompts is None
                           else [p.model_dump(exclude_none=True) for p in fields.image_prompts])
    def item_defaults(item: dict[str, Any] | None) -> dict[str, Any]:
        """The job fields of an item over the batch's defaults (its metadata apart)."""
        item = item or {}
        merged = {
            "prompts": item["prompts"] if item.get("prompts") is not None else (fields.prompts or []),
            "webhook_url": fields.webhook_url,
            "webhook_events": job_events,
            "preset": item["preset"] if item.get("preset") is not None else fields.preset,
            "outputs": item["outputs"] if item.get("outputs") is not None else fields.outputs,
            "image_prompts": (item["image_prompts"] if item.get("image_prompts") is not None
                              else batch_image_prompts or []),
            "box_prompts": (item["box_prompts"] if item.get("box_prompts") is not None
                            else [p.model_dump() for p in fields.box_prompts or []]),
            "embed": item["embed"] if item.get("embed") is not None else (fields.embed or []),
            "model": item["model"] if item.get("model") is not None else fields.model,
            "refine": item["refine"] if item.get("refine") is not None else fields.refine,
        }
        if item.get("threshold") is not None:  # (left out when neither sets one: labels keep their own)
            merged["threshold"] = item["threshold"]
        elif "threshold" in fields.model_fields_set:
            merged["threshold"] = fields.threshold
        return merged

    def item_spec(index: int, merged: dict[str, Any], image_input: dict[str, Any]) -> JobSpec:
        try:
            params = JobParams.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            raise _item_problem(index, field, first["msg"].removeprefix("Value error, ")) from exc
        try:
            shown, stored = examples(params)
        except ApiProblem as exc:
            raise _item_problem(index, "image_prompts", exc.detail) from exc
        try:
            labels = job_labels(resolve, params, shown)
        except presets.PresetError as exc:
            raise _item_problem(index, "preset" if exc.code == "unknown_preset" else "prompts", exc.message) from exc
        except tuned_models.ModelError as exc:
            raise _item_problem(index, "model", exc.message) from exc
        except ApiProblem as exc:  # no labels, or a field the base's family cannot serve (unsupported_for_model)
            field = str(exc.errors[0]["field"]) if exc.errors else "prompts"
            raise _item_problem(index, field, exc.detail) from exc
        return job_spec(params, labels=labels, input=image_input, image_prompts=shown, examples=stored,
                        model_ref=resolve.model(params.model)[0], base=resolve.base(params.model)[0])

    items: list[JobSpec] = []
    template: JobSpec | None = None
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _item_problem(index, "", "must be an object")
        unknown = [k for k in item if k not in ITEM_FIELDS]
        if unknown:
            raise _item_problem(index, unknown[0], "unknown field")
        given = [name for name in ("image_url", "image_s3_uri") if item.get(name) not in (None, "")]
        if len(given) != 1:
            raise _item_problem(index, "image_url", "give exactly one of image_url and image_s3_uri")
        source = item[given[0]]
        if not isinstance(source, str):
            raise _item_problem(index, given[0], "must be a string")
        try:
            if given[0] == "image_url":
                image_input = {"image_url": check_http_url(source)}
            else:
                image_input = {"image_s3_uri": source.strip()}
                check_s3_input(source.strip(), f"items[{index}].image_s3_uri")
        except ValueError as exc:
            raise _item_problem(index, given[0], str(exc)) from exc
        except ApiProblem as exc:
            raise _item_problem(index, given[0], exc.detail) from exc
        metadata = item.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _item_problem(index, "metadata", "must be an object of strings")
        merged_metadata = {**fields.metadata, **(metadata or {})}
        if FAST_ITEM_FIELDS.issuperset(item):
            # an item that sets only its image and metadata: everything else is the batch's, checked
            # and resolved once (10,000 such items: 1.3 s of validation before, a fraction now)
            if template is None:
                template = item_spec(index, {**item_defaults(None), "metadata": {}}, image_input)
            try:
                check_metadata(merged_metadata)
            except ValueError as exc:
                raise _item_problem(index, "metadata", str(exc)) from exc
            items.append(dataclasses.replace(template, input=image_input, metadata=merged_metadata))
            continue
        items.append(item_spec(index, {**item_defaults(item), "metadata": merged_metadata}, image_input))
    # The batch's own webhook gets batch.completed unless only job events were asked for.
    wants_completed = events is None or BatchEvent.COMPLETED in events
    return BatchSpec(items=items, metadata=fields.metadata,
                     webhook_url=fields.webhook_url if wants_completed else None, priority=fields.priority)


@bp.post("")
@spec.validate(json=BatchCreate, form=BatchCreateMultipart, headers=IdempotencyHeader,
               resp=Answers(202, BatchObject, "Accepted; every item is queued on the bulk queue.",
                            400, 409, 413, 415, 422, headers=ACCEPTED_HEADERS),
               operation_id="createBatch", tags=["batches"], skip_validation=True)
def create_batch() -> Response:
    """Submit a catalog: up to 100,000 items, all validated before any is queued"""
    svc = services()
    tenant = current_tenant()
    fields, raw, request_hash = _parse_request()
    if fields.webhook_url is not None:
        try:
            fields.webhook_url = check_http_url(fields.webhook_url)
        except ValueError as exc:
            raise ApiProblem(422, "invalid_webhook_url", f"webhook_url: {exc}",
                             errors=[{"field": "webhook_url", "message": str(exc)}]) from exc
    key = idempotency("batches.create", request_hash)
    batch = _validate_items(fields, raw, svc.settings.max_batch_items)
    accepted = svc.submitter.submit_batch(db(), tenant=tenant, spec=batch, idempotency=key)
    if not accepted.replayed:
        log.info("batch accepted (%d items)", len(batch.items), extra={"batch_id": accepted.id,
                                                                       "tenant_id": tenant.id})
    return respond(accepted)


def _batch_or_404(batch_id: str) -> Batch:
    batch = db().execute(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == current_tenant().id)
                         ).scalar_one_or_none()
    if batch is None:
        raise ApiProblem(404, "not_found", f"No batch {batch_id!r}.")
    return batch


def _batch_response(batch: Batch) -> Response:
    session = db()
    return jsonify(batch_object(batch, services().storage, counts=batchstate.counts(session, batch)))


@bp.get("/<batch_id>")
@spec.validate(resp=Answers(200, BatchObject, "The batch with its counts.", 404), operation_id="getBatch",
               tags=["batches"], skip_validation=True)
def get_batch(batch_id: str) -> Response:
    """Get a batch with its counts"""
    return _batch_response(_batch_or_404(batch_id))


@bp.get("/<batch_id>/jobs")
@spec.validate(query=BatchJobsQuery, resp=Answers(200, JobList, "A page of the batch's jobs, newest first.",
                                                  400, 404, 422),
               operation_id="listBatchJobs", tags=["batches"], skip_validation=True)
def list_batch_jobs(batch_id: str) -> Response:
    """The batch's jobs, newest first"""
    batch = _batch_or_404(batch_id)
    query = select(Job).where(Job.tenant_id == batch.tenant_id, Job.batch_id == batch.id)
    wanted = parse_status(JobStatus)
    if wanted:
        query = query.where(Job.status.in_(wanted))
    storage = services().storage
    return jsonify(page(db(), query, Job, lambda job: job_object(job, storage)))


@bp.post("/<batch_id>/cancel")
@spec.validate(resp=Answers(200, BatchObject, "The canceled batch (canceling it again changes nothing).", 404, 409),
               operation_id="cancelBatch", tags=["batches"], skip_validation=True)
def cancel_batch(batch_id: str) -> Response:
    """Cancel every job of the batch not yet finished"""
    svc = services()
    session = db()
    batch = _batch_or_404(batch_id)
    if batch.status == BatchStatus.COMPLETED:
        raise ApiProblem(409, "batch_not_cancelable", "The batch already completed.")
    if batch.status == BatchStatus.RUNNING:
        finished = batchstate.cancel(session, batch, svc.storage)
        session.commit()
        # The batch id goes along even when no job was left to cancel: its manifest is still due.
        after_commit(svc.celery, svc.sessions, Effects.of(finished, batch_ids=[batch.id]))
        session.refresh(batch)
    return _batch_response(batch)
