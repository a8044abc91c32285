"""Objects as the API shows them (jobs, batches, webhook deliveries): the one place that shapes them.

Pure functions of rows (and counts a caller queried); presigned URLs are made here, at read time,
because they expire. Webhook bodies and batch manifests use `long_urls` (the result lifetime).
"""

from __future__ import annotations

from typing import Any

from shared.clock import isoformat
from shared.enums import DeliveryStatus, JobStatus
from shared.storage import ObjectStorage
from shared.tables import Batch, Job, WebhookDelivery

# result field -> the stored key it is presigned from
RESULT_URLS = {"mask_url": "mask_key", "soft_url": "soft_key", "cutout_url": "cutout_key"}
JOB_OUTPUT_URLS = {"label_map": "label_map_url", "overlay": "overlay_url"}


def result_entry(item: dict[str, Any], storage: ObjectStorage, *, long_urls: bool) -> dict[str, Any]:
    """One label's result: the fields its job asked for (a stored key becomes a presigned URL)."""
    entry: dict[str, Any] = {"prompt": item["prompt"], "source": item.get("source", "text")}
    for url_field, key_field in RESULT_URLS.items():
        if key_field in item:
            key = item[key_field]
            entry[url_field] = None if key is None else storage.presign_get(key, long=long_urls)
    entry.update(bbox=item["bbox"], area_fraction=item["area_fraction"], score=item["score"])
    if "refine" in item:
        entry["refine"] = item["refine"]
    if "rle" in item:
        entry["rle"] = item["rle"]
    if "presence" in item:
        entry["presence"] = item["presence"]
    if "instances" in item:
        entry["instances"] = item["instances"]
    if "embedding" in item:
        entry["embedding"] = item["embedding"]
    return entry


def image_prompts_shown(stored: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The job's image prompts as given: {"label", "image_url"} or {"label", "sha256", "bytes"}
    for a base64 example (its object key stays inside)."""
    return [{k: v for k, v in p.items() if k != "key"} for p in stored or []]


def job_object(job: Job, storage: ObjectStorage, *, long_urls: bool = False) -> dict[str, Any]:
    """The public job object of the contract."""
    image = None
    if job.image_width is not None and job.image_height is not None:
        image = {"width": job.image_width, "height": job.image_height}
    results = []
    outputs: dict[str, str] = {}
    if job.status == JobStatus.SUCCEEDED:
        results = [result_entry(item, storage, long_urls=long_urls) for item in job.results or []]
        for name, key in (job.output_keys or {}).items():
            outputs[JOB_OUTPUT_URLS[name]] = storage.presign_get(key, long=long_urls)
    model: dict[str, Any] | None = None
    if job.model_id is not None and job.status != JobStatus.QUEUED:
        model = {"id": job.model_id, "revision": job.model_revision}
        if job.model_ref:  # a fine-tuned decoder on that backbone
            model = {"id": job.model_ref["id"], "revision": job.model_ref["revision"], "base": model}
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "input": job.input,
        "image": image,
        "prompts": list(job.prompts),
        "threshold": job.threshold,
        "results": results,
        "error": job.error if job.status == JobStatus.FAILED else None,
        "metadata": dict(job.metadata_ or {}),
        "batch_id": job.batch_id,
        "webhook_url": job.webhook_url,
        "attempts": job.attempts or 0,
        "preset": job.preset,
        "outputs_requested": list(job.outputs_requested or ["mask"]),
        "outputs": outputs,
        "refine": job.refine or "none",
        "model": model,
        "image_prompts": image_prompts_shown(job.image_prompts),
        "box_prompts": [{"label": label["name"], "boxes": label["boxes"], "negative_boxes": label["negative_boxes"]}
                        for label in job.labels or [] if label.get("source") == "box"],
        "embed": list(job.embed or []),
        "embedding": job.embedding,
        "embedding_model": job.embedding_model,
    }


def batch_counts(total: int, by_status: dict[str, int]) -> dict[str, int]:
    return {"total": total, **{str(status): int(by_status.get(status, 0)) for status in JobStatus}}


def batch_object(batch: Batch, storage: ObjectStorage, *, counts: dict[str, int],
                 long_urls: bool = False) -> dict[str, Any]:
    """The public batch object; `counts` comes from `shared.batches.counts` (or is known, at creation)."""
    return {
        "id": batch.id, "object": "batch", "status": batch.status, "counts": counts,
        "created_at": isoformat(batch.created_at), "finished_at": isoformat(batch.finished_at),
        "results_url": storage.presign_get(batch.results_key, long=long_urls) if batch.results_key else None,
        "metadata": dict(batch.metadata_ or {}), "webhook_url": batch.webhook_url,
        "priority": batch.priority or "normal",
    }


def delivery_object(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": row.id, "object": "webhook_delivery", "event_type": row.event_type,
        "job_id": row.job_id, "batch_id": row.batch_id, "url": row.url, "status": row.status,
        "attempts": row.attempts, "last_status_code": row.last_status_code, "last_error": row.last_error,
        "next_attempt_at": isoformat(row.next_attempt_at) if row.status == DeliveryStatus.PENDING else None,
        "created_at": isoformat(row.created_at), "delivered_at": isoformat(row.delivered_at),
    }
