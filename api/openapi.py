"""The OpenAPI 3.1 document, generated from the same pydantic models the handlers validate with,
and /docs, a small self-contained page that renders it (no CDN: works offline)."""

from __future__ import annotations

from functools import cache
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic.json_schema import models_json_schema

from api.schemas import (
    BatchCreate,
    BatchCreateMultipart,
    BatchObject,
    JobCreateJson,
    JobCreateMultipart,
    JobList,
    JobObject,
    Problem,
    WebhookDeliveryList,
    WebhookDeliveryObject,
)

VALIDATION_MODELS = (JobCreateJson, JobCreateMultipart, BatchCreate, BatchCreateMultipart)

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"

ERROR_CODES = {
    400: "malformed_json, invalid_body, invalid_cursor, invalid_idempotency_key, bad_request",
    401: "unauthorized",
    404: "not_found",
    409: "job_not_cancelable, batch_not_cancelable, idempotency_key_reused",
    413: "payload_too_large",
    415: "unsupported_media_type, unsupported_image_type",
    422: "invalid_prompts, invalid_threshold, invalid_webhook_url, invalid_webhook_events, invalid_metadata, "
    "invalid_image_url, invalid_image_base64, missing_image, multiple_images, empty_image, unknown_field, "
    "invalid_limit, invalid_status, invalid_request, invalid_items, invalid_batch_item (errors[0].field names "
    "the item: items[17].image_url)",
    429: "rate_limited, too_many_queued_jobs (with Retry-After)",
    503: "dependency_unavailable (with Retry-After)",
}


def _problem(status: int) -> dict[str, Any]:
    return {
        "description": f"Problem document; code one of: {ERROR_CODES.get(status, 'see description')}",
        "content": {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}},
    }


def _json(model: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}},
    }
    if headers:
        out["headers"] = headers
    return out


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _problem(s) for s in (401, *statuses, 429, 503)}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
STATUS = {"name": "status", "in": "query", "schema": {"type": "string"},
          "description": "One status or several separated by commas."}
LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}
CURSOR = {"name": "cursor", "in": "query", "schema": {"type": "string"}}
IDEMPOTENCY = {
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
    "description": "Same key and body within 24 h replays the first response; another body is 409.",
}


@cache
def document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation" if m in VALIDATION_MODELS else "serialization")
         for m in (*VALIDATION_MODELS, JobObject, JobList, BatchObject, WebhookDeliveryObject, WebhookDeliveryList,
                   Problem)],
        ref_template=REF,
    )
    schemas = defs["$defs"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clipmask", "version": "1",
            "description": "Text-prompted image segmentation (CLIPSeg) as an asynchronous job queue.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "createJob",
                    "summary": "Create a segmentation job",
                    "parameters": [IDEMPOTENCY],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="JobCreateJson")}},
                        "multipart/form-data": {"schema": {"$ref": REF.format(model="JobCreateMultipart")}},
                    }},
                    "responses": {
                        "202": _json("JobObject", "Accepted; the job is queued.",
                                     {"Location": {"schema": {"type": "string"}}}),
                        **_errors(400, 409, 413, 415, 422),
                    },
                },
                "get": {
                    "operationId": "listJobs",
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"},
                         "description": "One status or several separated by commas."},
                        {"name": "batch_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json("JobList", "A page of jobs."), **_errors(400, 422)},
                },
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "operationId": "getJob", "summary": "Get a job", "parameters": [JOB_ID],
                    "responses": {"200": _json("JobObject", "The job."), **_errors(404)},
                },
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a queued or running job (canceling a canceled job is a no-op)",
                    "parameters": [JOB_ID],
                    "responses": {"200": _json("JobObject", "The canceled job."), **_errors(404, 409)},
                },
            },
            "/v1/batches": {
                "post": {
                    "operationId": "createBatch",
                    "summary": "Submit a catalog: up to 100,000 items, all validated before any is queued",
                    "parameters": [IDEMPOTENCY],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="BatchCreate")}},
                        "multipart/form-data": {"schema": {"$ref": REF.format(model="BatchCreateMultipart")}},
                    }},
                    "responses": {
                        "202": _json("BatchObject", "Accepted; every item is queued on the bulk queue.",
                                     {"Location": {"schema": {"type": "string"}}}),
                        **_errors(400, 409, 413, 415, 422),
                    },
                },
            },
            "/v1/batches/{batch_id}": {
                "get": {
                    "operationId": "getBatch", "summary": "Get a batch with its counts", "parameters": [BATCH_ID],
                    "responses": {"200": _json("BatchObject", "The batch."), **_errors(404)},
                },
            },
            "/v1/batches/{batch_id}/jobs": {
                "get": {
                    "operationId": "listBatchJobs", "summary": "The batch's jobs, newest first",
                    "parameters": [BATCH_ID, STATUS, LIMIT, CURSOR],
                    "responses": {"200": _json("JobList", "A page of jobs."), **_errors(400, 404, 422)},
                },
            },
            "/v1/batches/{batch_id}/cancel": {
                "post": {
                    "operationId": "cancelBatch", "summary": "Cancel every job of the batch not yet finished",
                    "parameters": [BATCH_ID],
                    "responses": {"200": _json("BatchObject", "The canceled batch."), **_errors(404, 409)},
                },
            },
            "/v1/webhook-deliveries": {
                "get": {
                    "operationId": "listWebhookDeliveries", "summary": "Webhook deliveries, newest first",
                    "parameters": [
                        {"name": "job_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "batch_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "status", "in": "query", "schema": {"type": "string"},
                         "description": "pending, succeeded or failed; several separated by commas."},
                        LIMIT, CURSOR,
                    ],
                    "responses": {"200": _json("WebhookDeliveryList", "A page of deliveries."),
                                  **_errors(400, 422)},
                },
            },
            "/v1/webhook-deliveries/{delivery_id}/retry": {
                "post": {
                    "operationId": "retryWebhookDelivery", "summary": "Deliver again now (same webhook-id)",
                    "parameters": [{"name": "delivery_id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"202": _json("WebhookDeliveryObject", "Queued for delivery now."),
                                  **_errors(404)},
                },
            },
            "/healthz": {"get": {
                "operationId": "healthz", "security": [], "summary": "Process is serving",
                "responses": {"200": {"description": "ok"}},
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "security": [], "summary": "Postgres, Redis and storage answer",
                "responses": {"200": {"description": "ready"}, "503": _problem(503)},
            }},
            "/metrics": {"get": {
                "operationId": "metrics", "security": [], "summary": "Prometheus metrics (text format)",
                "responses": {"200": {"description": "clipmask_http_requests_total, "
                                      "clipmask_http_request_duration_seconds, clipmask_jobs_created_total, "
                                      "clipmask_queue_depth"}},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "security": [], "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1 document"}},
            }},
            "/docs": {"get": {
                "operationId": "docs", "security": [], "summary": "Human-readable API reference",
                "responses": {"200": {"description": "HTML page"}},
            }},
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(document())


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>clipmask API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd}.op{margin:1rem 0;padding:.5rem 1rem;border-left:4px solid #4a7}
.m{font-weight:bold;text-transform:uppercase;margin-right:.5rem}pre{background:#f6f6f6;padding:.5rem;overflow:auto}
</style></head><body><h1>clipmask API</h1><p>Machine-readable: <a href="/openapi.json">/openapi.json</a></p>
<div id="ops">Loading&hellip;</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const out = [];
  const esc = s => String(s).replace(/[&<>]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const codes = Object.entries(op.responses || {}).map(([c, r]) => `<li><b>${c}</b> ${esc(r.description)}</li>`);
      out.push(`<div class="op"><span class="m">${method}</span><code>${esc(path)}</code>
        <p>${esc(op.summary || '')}</p><ul>${codes.join('')}</ul></div>`);
    }
  }
  out.push('<h2>Schemas</h2>');
  for (const [name, schema] of Object.entries(doc.components.schemas)) {
    out.push(`<h3>${esc(name)}</h3><pre>${esc(JSON.stringify(schema, null, 2))}</pre>`);
  }
  document.getElementById('ops').innerHTML = out.join('');
});
</script></body></html>"""


@bp.get("/docs")
def docs() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")
