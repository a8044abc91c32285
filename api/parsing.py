"""Request parsing shared by the blueprints: JSON bodies, multipart fields, images, status filters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from flask import request
from werkzeug.datastructures import MultiDict

from api.auth import current_tenant
from api.problems import ApiProblem
from api.schemas import JobParams
from api.services import db, services
from shared import presets, tuned_models
from shared.images import sniff
from shared.s3uri import input_refusal, parse_s3_uri
from shared.storage import example_key
from shared.submit import JobSpec

DATA_URI = re.compile(r"^data:(?P<type>[\w/+.-]*)(;[\w=-]+)*;base64,", re.IGNORECASE)
# Postgres stores neither NUL in text/jsonb nor lone UTF-16 surrogates (they don't encode as UTF-8).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_INT_DIGITS = 4000  # below Python's 4,300-digit limit on int(str); longer integers parse as float (inf)
LIST_FIELDS = frozenset({"prompts", "webhook_events", "outputs", "embed"})
JSON_FIELDS = {"metadata": "invalid_metadata",
               "image_prompts": "invalid_image_prompts"}  # form fields that hold a JSON string -> their error code


def is_json_request() -> bool:
    mimetype = request.mimetype or ""
    return mimetype == "application/json" or mimetype.endswith("+json")


def is_multipart_request() -> bool:
    return request.mimetype == "multipart/form-data"


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def loads(raw: str | bytes) -> Any:
    """json.loads, except that a 5,000-digit integer is a (huge) number, not a ValueError."""
    return json.loads(raw, parse_int=_parse_int)


def unstorable_path(value: Any, path: str = "") -> str | None:
    """The path (`prompts[0]`, `metadata.sku`) of the first string, or key, Postgres can't store."""
    if isinstance(value, str):
        return path if UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and UNSTORABLE.search(key):
                return here.encode("unicode_escape").decode()
            found = unstorable_path(item, here)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = unstorable_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def refuse_unstorable(value: Any, codes: dict[str, str], *, default: str = "invalid_request",
                      prefix: str = "") -> None:
    """422 with the field's code if any string in `value` holds NUL or a lone surrogate."""
    path = unstorable_path(value, prefix)
    if path is None:
        return
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    raise ApiProblem(422, codes.get(top, default), f"{path} holds a NUL character or a lone surrogate, "
                     "which can't be stored; send valid Unicode text.",
                     errors=[{"field": path, "message": "NUL or lone surrogate"}])


def text_ok(value: str) -> bool:
    return UNSTORABLE.search(value) is None


def json_body(codes: dict[str, str]) -> dict[str, Any]:
    """The body as a JSON object, or 400 `malformed_json` / `invalid_body`; 422 with the field's code
    (`codes`: top-level field -> code) for text Postgres can't store."""
    raw = request.get_data(cache=False)
    try:
        body = loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiProblem(400, "malformed_json", "The body is not valid UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise ApiProblem(400, "malformed_json", f"The body is not valid JSON: {exc.msg} at char {exc.pos}.") from exc
    except RecursionError as exc:
        raise ApiProblem(400, "malformed_json", "The JSON body is nested too deeply.") from exc
    if not isinstance(body, dict):
        raise ApiProblem(400, "invalid_body", "The JSON body must be an object.")
    refuse_unstorable(body, codes)
    return body


def form_fields(form: MultiDict[str, str], codes: dict[str, str]) -> dict[str, Any]:
    """Multipart form fields as the JSON body would hold them: list fields repeat, metadata is JSON."""
    fields: dict[str, Any] = {}
    for name in form:
        values = form.getlist(name)
        if name in LIST_FIELDS:
            fields[name] = values
        elif name in JSON_FIELDS:
            try:
                fields[name] = loads(values[-1])
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ApiProblem(422, JSON_FIELDS[name], f"{name} must be a JSON object string.",
                                 errors=[{"field": name, "message": "not valid JSON"}]) from exc
        else:
            fields[name] = values[-1]
    refuse_unstorable(fields, codes)  # after parsing: a JSON string may spell NUL as \u0000
    return fields


def decode_base64_image(text: str) -> bytes:
    """Base64 or a data: URI -> bytes, or 422 `invalid_image_base64`."""
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


def check_image_bytes(data: bytes, field: str) -> None:
    """422 `empty_image` for nothing, 415 `unsupported_image_type` for bytes that are no image we read."""
    if not data:
        raise ApiProblem(422, "empty_image", "The image is empty (0 bytes).",
                         errors=[{"field": field, "message": "empty"}])
    if sniff(data) is None:
        raise ApiProblem(
            415, "unsupported_image_type",
            "The image is not in a format we can read (JPEG, PNG, WebP, GIF, BMP, TIFF and others are).",
            errors=[{"field": field, "message": "not a supported image"}],
        )


class LabelResolver:
    """A job's labels from its preset and prompts; each preset id is looked up once per request
    (a batch of 100,000 items naming one preset reads it once)."""

    def __init__(self) -> None:
        self._presets: dict[str, presets.PresetDef] = {}
        self._models: dict[str, tuple[dict[str, str] | None, list[dict[str, Any]]]] = {}

    def model(self, model_id: str | None) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
        """(the job's model_ref, the model's own labels) for `model`: (None, []) for the deployment's
        base model or none; a tenant's fine-tuned model by its current revision; else 422 unknown_model."""
        if model_id is None:
            return None, []
        if model_id not in self._models:
            session, tenant, settings = db(), current_tenant(), services().settings
            if model_id == settings.model or tuned_models.current_base(session, model_id,
                                                                ttl_s=settings.served_base_ttl_s) is not None:
                self._models[model_id] = (None, [])
            else:
                row = tuned_models.find_model(session, tenant.id, model_id)
                if row is None:
                    raise tuned_models.UnknownModel(f"No model {model_id!r}: use the deployment's base model or one of "
                                             "yours (GET /v1/models).")
                base = tuned_models.current_base(session, row.base_id, ttl_s=settings.served_base_ttl_s)
                if base is None or (row.base_revision and base.revision and row.base_revision != base.revision):
                    raise tuned_models.BaseNotServed(
                        f"model {model_id!r} was made for {row.base_id} (revision {row.base_revision}), which this "
                        "deployment no longer serves; it runs only on the exact base it was made for")
                labels = [{"name": label["name"], "prompts": list(label["prompts"]), "source": "model",
                           "model_label": index,
                           **({"threshold": label["threshold"]} if label.get("threshold") is not None else {})}
                          for index, label in enumerate(row.labels)]
                self._models[model_id] = ({"id": row.id, "revision": row.revision}, labels)
        return self._models[model_id]

    def __call__(self, preset_id: str | None, prompts: list[str], *, field: str = "prompts",
                 image_prompts: list[dict[str, Any]] | None = None, embed: list[str] | None = None,
                 model: str | None = None) -> list[dict[str, Any]]:
        ref, own = self.model(model)
        if ref is not None and not prompts and preset_id is None and not image_prompts:
            return own  # a fine-tuned model's own labels, at their calibrated thresholds
        if not prompts and preset_id is None and not image_prompts and not embed:
            raise ApiProblem(422, "invalid_prompts", "Give prompts, a preset, image_prompts or embed.",
                             errors=[{"field": field, "message": "give prompts, a preset, image_prompts or embed"}])
        found = None
        if preset_id is not None:
            found = self._presets.get(preset_id)
            if found is None:
                found = presets.find(db(), current_tenant().id, preset_id)
                if found is None:
                    raise presets.UnknownPreset(preset_id)
                self._presets[preset_id] = found
        return presets.expand(found, prompts, image_prompts or [])


def check_s3_input(uri: str, field: str) -> None:
    """422 invalid_image_s3_uri unless the operator allowed the URI's bucket for this tenant (and, in
    the deployment's own bucket, the key is one of the tenant's uploads)."""
    bucket, key = parse_s3_uri(uri)
    tenant = current_tenant()
    refusal = input_refusal(bucket, key, tenant_id=tenant.id, allowed=tenant.input_buckets,
                            own_bucket=services().settings.s3_bucket)
    if refusal is not None:
        raise ApiProblem(422, "invalid_image_s3_uri", f"{refusal[0].upper()}{refusal[1:]}; an operator allows "
                         "buckets per tenant (clipmask tenant limits --input-bucket).",
                         errors=[{"field": field, "message": refusal}])


class ImagePrompts:
    """A request's image prompts as a job stores them: URLs as given, base64 examples decoded,
    checked (422 invalid_image_prompts) and keyed by content for storage. One per request, so that a
    batch's shared example is decoded and checked once."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[dict[str, Any], bytes]] = {}

    def __call__(self, params: JobParams, *,
                 field: str = "image_prompts") -> tuple[list[dict[str, Any]], dict[str, bytes]]:
        shown: list[dict[str, Any]] = []
        examples: dict[str, bytes] = {}
        for index, prompt in enumerate(params.image_prompts):
            if prompt.image_url is not None:
                shown.append({"label": prompt.label, "image_url": prompt.image_url})
                continue
            assert prompt.image_base64 is not None
            cached = self._seen.get(prompt.image_base64)
            if cached is None:
                where = f"{field}[{index}].image_base64"
                try:
                    data = decode_base64_image(prompt.image_base64)
                    check_image_bytes(data, where)
                except ApiProblem as exc:
                    raise ApiProblem(422, "invalid_image_prompts", f"{where}: {exc.detail}",
                                     errors=[{"field": where, "message": exc.detail}]) from exc
                digest = hashlib.sha256(data).hexdigest()
                key = example_key(tenant_id=current_tenant().id, digest=digest)
                cached = ({"sha256": digest, "bytes": len(data), "key": key}, data)
                self._seen[prompt.image_base64] = cached
            info, data = cached
            shown.append({"label": prompt.label, **info})
            examples[info["key"]] = data
        return shown, examples


def job_labels(resolve: LabelResolver, params: JobParams, image_prompts: list[dict[str, Any]], *,
               field: str = "prompts") -> list[dict[str, Any]]:
    return resolve(params.preset, params.prompts, field=field, image_prompts=image_prompts,
                   embed=[str(e) for e in params.embed], model=params.model)


def job_spec(params: JobParams, *, labels: list[dict[str, Any]], input: dict[str, Any], image: bytes | None = None,
             filename: str | None = None, image_prompts: list[dict[str, Any]] | None = None,
             examples: dict[str, bytes] | None = None, model_ref: dict[str, str] | None = None) -> JobSpec:
    """What the submission service takes, from validated fields and the image source. A job that gives
    its own `threshold` applies it to every label: its preset labels' own thresholds are dropped."""
    events = None if params.webhook_events is None else [str(e) for e in params.webhook_events]
    if "threshold" in params.model_fields_set:
        labels = [{k: v for k, v in label.items() if k != "threshold"} for label in labels]
    return JobSpec(prompts=params.prompts, threshold=params.threshold, input=input, metadata=params.metadata,
                   webhook_url=params.webhook_url, webhook_events=events, image=image, filename=filename,
                   labels=labels, preset=params.preset, outputs=[str(o) for o in params.outputs],
                   image_prompts=image_prompts or [], examples=examples or {}, embed=[str(e) for e in params.embed],
                   model_ref=model_ref, refine=str(params.refine))


def parse_status(allowed: Iterable[str]) -> list[str]:
    """The `status` query parameter: one value or several separated by commas."""
    known = [str(s) for s in allowed]
    wanted = [s.strip() for s in request.args.get("status", "").split(",") if s.strip()]
    bad = [s for s in wanted if s not in known]
    if bad:
        raise ApiProblem(422, "invalid_status", f"Unknown status {bad[0]!r}; one of {', '.join(known)}.",
                         errors=[{"field": "status", "message": "unknown status"}])
    return wanted


FILTER_CODES = {"job_id": "invalid_job_id", "batch_id": "invalid_batch_id"}


def refuse_unstorable_ids() -> None:
    """before_request (after auth): an id in the path that can't be stored can't exist (404); a filter
    in the query that can't be stored is refused with its code (422). Neither reaches Postgres."""
    for value in (request.view_args or {}).values():
        if isinstance(value, str) and not text_ok(value):
            raise ApiProblem(404, "not_found", "No such resource: the id holds a NUL character or a lone surrogate.")
    for name, code in FILTER_CODES.items():
        for value in request.args.getlist(name):
            if not text_ok(value):
                raise ApiProblem(422, code, f"{name} holds a NUL character or a lone surrogate.",
                                 errors=[{"field": name, "message": "NUL or lone surrogate"}])
