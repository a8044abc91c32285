"""The wire: JSON bodies, multipart fields, base64 images, status filters. Nothing here reads the
database or the tenant (api/labels.py does)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from typing import Any

from flask import request
from werkzeug.datastructures import MultiDict

from api.problems import ApiProblem
from shared.images import sniff

DATA_URI = re.compile(r"^data:(?P<type>[\w/+.-]*)(;[\w=-]+)*;base64,", re.IGNORECASE)
# Postgres stores neither NUL in text/jsonb nor lone UTF-16 surrogates (they don't encode as UTF-8).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_INT_DIGITS = 4000  # below Python's 4,300-digit limit on int(str); longer integers parse as float (inf)
LIST_FIELDS = frozenset({"prompts", "webhook_events", "outputs", "embed"})
# form fields that hold a JSON string -> their error code
JSON_FIELDS = {"metadata": "invalid_metadata", "image_prompts": "invalid_image_prompts",
               "box_prompts": "invalid_box_prompts"}


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
