"""clipmask's Python client (httpx): the whole HTTP contract, typed results, errors with codes.

    from client import Clipmask
    cm = Clipmask("http://127.0.0.1:8000", api_key="cm_...")
    job = cm.wait(cm.create_job("photo.jpg", prompts=["shirt", "pants"]).id)
    cm.download(job.results[0].mask_url, "shirt.png")
    job = cm.create_job("photo.jpg", preset="clothing", outputs=["cutout", "label_map"], wait=30)

Creates send an Idempotency-Key (generated unless given), so the client retries them safely:
429 and 503 are retried after Retry-After, connection errors with backoff (`max_retries`).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# The contract's final statuses (its Jobs and Batches sections): spelled here, so the client ships
# without the server's packages; tests/test_client_contract.py holds them to shared.enums.
FINISHED = frozenset({"succeeded", "failed", "canceled"})
BATCH_FINISHED = frozenset({"completed", "canceled"})


class ClipmaskError(Exception):
    """A problem document from the API (or no answer at all: status 0, code `unreachable`)."""

    def __init__(self, status: int, code: str, detail: str, *, errors: list[dict[str, str]] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.errors = errors or []
        self.retry_after = retry_after


@dataclass(frozen=True)
class MaskResult:
    """One label's result; the URL and `rle` fields are None unless the job asked for that output."""

    prompt: str
    bbox: list[int] | None
    area_fraction: float
    score: float
    source: str = "text"  # preset, text, image or box
    mask_url: str | None = None
    soft_url: str | None = None
    cutout_url: str | None = None
    rle: dict[str, Any] | None = None
    refine: str | None = None  # none, guided or matting: how this label's outputs were refined
    # outputs: instances - [{"bbox", "score", "area_fraction", "rle"}], best first
    instances: list[dict[str, Any]] | None = None
    presence: float | None = None  # sam3 bases: how sure the model is that the label appears at all

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> MaskResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    input: dict[str, Any]
    image: dict[str, int] | None
    prompts: list[str]
    threshold: float
    results: list[MaskResult]
    error: dict[str, str] | None
    metadata: dict[str, str]
    batch_id: str | None
    webhook_url: str | None
    attempts: int | None  # times a worker took the job
    preset: str | None
    outputs_requested: list[str] | None
    outputs: dict[str, str] | None  # label_map_url, overlay_url
    model: dict[str, str | None] | None
    refine: str | None  # as asked: none, guided or matting
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Job:
        fields: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__ if k not in ("results", "raw")}
        return cls(**fields, results=[MaskResult.from_api(r) for r in data.get("results") or []], raw=data)


@dataclass(frozen=True)
class Batch:
    id: str
    status: str
    counts: dict[str, int]
    created_at: str
    finished_at: str | None
    results_url: str | None
    metadata: dict[str, str]
    webhook_url: str | None
    priority: str | None  # low | normal | high (None from a server before fair share)
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in BATCH_FINISHED

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Batch:
        fields: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__ if k != "raw"}
        return cls(**fields, raw=data)


@dataclass(frozen=True)
class WebhookDelivery:
    id: str
    event_type: str
    job_id: str | None
    batch_id: str | None
    url: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    created_at: str
    delivered_at: str | None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> WebhookDelivery:
        fields: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**fields)


@dataclass(frozen=True)
class Page:
    data: list[Any]
    next_cursor: str | None


class Clipmask:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0, max_retries: int = 4,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.max_retries = max_retries
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}", "User-Agent": "clipmask-python/1"})
        self._plain = httpx.Client(timeout=timeout)  # presigned URLs: no API key sent to storage

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> Clipmask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries or not retry
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise ClipmaskError(0, "unreachable", f"{type(exc).__name__}: {exc}") from exc
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
                continue
            if resp.status_code < 400:
                body: dict[str, Any] = resp.json()
                return body
            error = _problem(resp)
            if resp.status_code in (429, 503) and not last:
                time.sleep(min(30.0, error.retry_after or 0.5 * 2 ** attempt))
                continue
            raise error
        raise AssertionError("unreachable")

    # ---- jobs --------------------------------------------------------------------------------
    def create_job(self, image: str | Path | bytes, prompts: list[str] | None = None, *, preset: str | None = None,
                   outputs: list[str] | None = None, threshold: float | None = None, webhook_url: str | None = None,
                   webhook_events: list[str] | None = None, metadata: dict[str, str] | None = None,
                   idempotency_key: str | None = None, wait: int | None = None,
                   image_prompts: dict[str, str | Path | bytes] | None = None, embed: list[str] | None = None,
                   model: str | None = None, refine: str | None = None,
                   box_prompts: list[dict[str, Any]] | None = None) -> Job:
        """`image`: an http(s) URL (the worker fetches it), an s3:// URI from a bucket your tenant may
        read, a file path, or the image bytes. `wait` (1 to 60 s) asks the API to answer once the job
        is final, if it gets there within that time (Prefer: wait). `image_prompts`: label -> example
        image (URL, path or bytes), segmented by look. `embed`: "image" and/or "masks". `model`: one
        of the deployment's bases (list_models: a sam3 base too) or of your fine-tuned models; without
        prompts and preset, a fine-tuned model's own labels. `refine`: none, guided (edges that follow
        the photo) or matting (soft maps and cutouts from a matte). `box_prompts` (sam3 bases):
        [{"label", "boxes": [[x0, y0, x1, y1]], "negative_boxes": [...]}]."""
        fields: dict[str, Any] = {}
        examples = None if image_prompts is None else [image_prompt(label, ex) for label, ex in image_prompts.items()]
        for name, value in (("prompts", prompts), ("preset", preset), ("outputs", outputs),
                            ("threshold", threshold), ("webhook_url", webhook_url),
                            ("webhook_events", webhook_events), ("metadata", metadata),
                            ("image_prompts", examples), ("embed", embed), ("model", model), ("refine", refine),
                            ("box_prompts", box_prompts)):
            if value is not None:
                fields[name] = value
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if wait is not None:
            headers["Prefer"] = f"wait={wait}"
        if isinstance(image, str) and image.startswith(("http://", "https://", "s3://")):
            source = "image_s3_uri" if image.startswith("s3://") else "image_url"
            return Job.from_api(self._request("POST", "/v1/jobs", json={source: image, **fields}, headers=headers))
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "image" if isinstance(image, bytes) else Path(image).name
        form: dict[str, Any] = {}
        for key, value in fields.items():  # list fields repeat; metadata and image_prompts are JSON strings
            form[key] = (json.dumps(value) if key in ("metadata", "image_prompts", "box_prompts")
                         else value if isinstance(value, list) else str(value))
        return Job.from_api(self._request("POST", "/v1/jobs", data=form, files={"image": (name, data)},
                                          headers=headers))

    def get_job(self, job_id: str) -> Job:
        return Job.from_api(self._request("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, *, status: str | None = None, batch_id: str | None = None, limit: int = 100,
                  cursor: str | None = None) -> Page:
        params = {k: v for k, v in (("status", status), ("batch_id", batch_id), ("limit", limit),
                                    ("cursor", cursor)) if v is not None}
        body = self._request("GET", "/v1/jobs", params=params)
        return Page([Job.from_api(j) for j in body["data"]], body["next_cursor"])

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_api(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Until the job finished (TimeoutError after `timeout` seconds). The API holds each GET until
        the job is final or up to 60 s pass (Prefer: wait), so this does not poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hold = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
            job = Job.from_api(self._request("GET", f"/v1/jobs/{job_id}", headers={"Prefer": f"wait={hold}"}))
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")

    def fetch(self, url: str) -> bytes:
        """The bytes behind a presigned URL (a mask, a manifest)."""
        resp = self._plain.get(url)
        if resp.status_code != 200:
            raise ClipmaskError(resp.status_code, "download_failed", f"GET {url[:80]}... answered {resp.status_code}")
        return resp.content

    def download(self, url: str, path: str | Path) -> Path:
        """Save a presigned URL (a mask, a manifest) to `path`, atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(self.fetch(url))
        tmp.replace(target)
        return target

    # ---- batches -----------------------------------------------------------------------------
    def create_batch(self, *, items: list[dict[str, Any]] | None = None, file: str | Path | None = None,
                     prompts: list[str] | None = None, preset: str | None = None, outputs: list[str] | None = None,
                     threshold: float | None = None, webhook_url: str | None = None,
                     webhook_events: list[str] | None = None, metadata: dict[str, str] | None = None,
                     idempotency_key: str | None = None, model: str | None = None,
                     refine: str | None = None, priority: str | None = None) -> Batch:
        """Items as a list of dicts, or `file`: a JSONL or CSV catalog uploaded as is. `prompts`,
        `preset`, `outputs` and the rest are the defaults for items that set none; `priority` (low,
        normal, high) orders this tenant's batches."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        fields: dict[str, Any] = {k: v for k, v in (("prompts", prompts), ("preset", preset), ("outputs", outputs),
                                                    ("threshold", threshold), ("model", model), ("refine", refine),
                                                    ("webhook_url", webhook_url), ("webhook_events", webhook_events),
                                                    ("metadata", metadata), ("priority", priority))
                                  if v is not None}
        if file is None:
            return Batch.from_api(self._request("POST", "/v1/batches", json={"items": items, **fields},
                                                headers=headers))
        form = {k: (json.dumps(v) if k == "metadata" else v if isinstance(v, list) else str(v))
                for k, v in fields.items()}
        path = Path(file)
        kind = "text/csv" if path.suffix.lower() == ".csv" else "application/x-ndjson"
        return Batch.from_api(self._request("POST", "/v1/batches", data=form, headers=headers,
                                            files={"items": (path.name, path.read_bytes(), kind)}))

    # ---- search ------------------------------------------------------------------------------
    def search(self, *, text: str | None = None, image: str | Path | bytes | None = None,
               job_id: str | None = None, result_index: int | None = None, scope: str = "images", limit: int = 10,
               batch_id: str | None = None, metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The most similar stored embeddings of your jobs run with `embed`, best first: by text, by an
        image (URL, path or bytes) or by a stored job (and result)."""
        body: dict[str, Any] = {"scope": scope, "limit": limit}
        if text is not None:
            body["text"] = text
        if image is not None:
            body.update(_image_source(image))
        if job_id is not None:
            body["job_id"] = job_id
            body["result_index"] = result_index
        if batch_id is not None:
            body["batch_id"] = batch_id
        if metadata:
            body["metadata"] = metadata
        data: list[dict[str, Any]] = self._request("POST", "/v1/search", json=body)["data"]
        return data

    # ---- models ------------------------------------------------------------------------------
    def create_model(self, folder: str | Path, model_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload the folder `clipmask finetune` wrote (clipmask-model.json, decoder.safetensors). A
        retry after a lost answer replays the first 201 (the Idempotency-Key) instead of 409 model_exists."""
        root = Path(folder)
        files = {"manifest": ("clipmask-model.json", (root / "clipmask-model.json").read_bytes()),
                 "weights": ("decoder.safetensors", (root / "decoder.safetensors").read_bytes())}
        return self._request("POST", "/v1/models", data={"id": model_id}, files=files,
                             headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_id}")

    def list_models(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/v1/models")["data"]
        return data

    def delete_model(self, model_id: str) -> None:
        resp = self._http.delete(f"/v1/models/{model_id}")
        if resp.status_code != 204:
            raise _problem(resp)

    # ---- presets -----------------------------------------------------------------------------
    def list_presets(self) -> list[dict[str, Any]]:
        """Every preset (built-ins, then yours), following the pages."""
        data: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            body = self._request("GET", "/v1/presets", params=params)
            data += body["data"]
            if not body.get("next_cursor"):
                return data
            params["cursor"] = body["next_cursor"]

    def create_preset(self, preset_id: str, labels: list[dict[str, Any]], *,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        """labels: [{"name": "blouse", "prompts": ["a blouse", "a women's top"]}, ...]; retried safely
        (an Idempotency-Key, generated unless given)."""
        return self._request("POST", "/v1/presets", json={"id": preset_id, "labels": labels},
                             headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})

    def delete_preset(self, preset_id: str) -> None:
        resp = self._http.delete(f"/v1/presets/{preset_id}")
        if resp.status_code != 204:
            raise _problem(resp)

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_api(self._request("GET", f"/v1/batches/{batch_id}"))

    def list_batch_jobs(self, batch_id: str, *, status: str | None = None, limit: int = 100,
                        cursor: str | None = None) -> Page:
        params = {k: v for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
        body = self._request("GET", f"/v1/batches/{batch_id}/jobs", params=params)
        return Page([Job.from_api(j) for j in body["data"]], body["next_cursor"])

    def iter_batch_jobs(self, batch_id: str, *, status: str | None = None) -> Iterator[Job]:
        cursor = None
        while True:
            page = self.list_batch_jobs(batch_id, status=status, cursor=cursor)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.from_api(self._request("POST", f"/v1/batches/{batch_id}/cancel"))

    # ---- webhook deliveries ------------------------------------------------------------------
    def list_webhook_deliveries(self, *, job_id: str | None = None, batch_id: str | None = None,
                                status: str | None = None, limit: int = 100, cursor: str | None = None) -> Page:
        params = {k: v for k, v in (("job_id", job_id), ("batch_id", batch_id), ("status", status),
                                    ("limit", limit), ("cursor", cursor)) if v is not None}
        body = self._request("GET", "/v1/webhook-deliveries", params=params)
        return Page([WebhookDelivery.from_api(d) for d in body["data"]], body["next_cursor"])

    def retry_webhook_delivery(self, delivery_id: str) -> WebhookDelivery:
        return WebhookDelivery.from_api(self._request("POST", f"/v1/webhook-deliveries/{delivery_id}/retry"))


def _problem(resp: httpx.Response) -> ClipmaskError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    retry_after = resp.headers.get("Retry-After")
    return ClipmaskError(
        resp.status_code, str(body.get("code", "http_error")), str(body.get("detail", resp.text[:200])),
        errors=body.get("errors"), retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


def _image_source(image: str | Path | bytes) -> dict[str, str]:
    """{"image_url"} for an http(s) URL, else {"image_base64"} of the file's or the given bytes."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"image_url": image}
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return {"image_base64": base64.b64encode(data).decode()}


def image_prompt(label: str, example: str | Path | bytes) -> dict[str, str]:
    return {"label": label, **_image_source(example)}
