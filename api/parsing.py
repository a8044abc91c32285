"""Request parsing shared by the blueprints: JSON bodies, multipart fields, images, status filters."""

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
LIST_FIELDS = frozenset({"prompts", "webhook_events"})
JSON_FIELDS = {"metadata": "invalid_metadata"}  # form fields that hold a JSON string -> their error code


def is_json_request() -> bool:
    mimetype = request.mimetype or ""
    return mimetype == "application/json" or mimetype.endswith("+json")


def is_multipart_request() -> bool:
    return request.mimetype == "multipart/form-data"


def json_body() -> dict[str, Any]:
    """The body as a JSON object, or 400 `malformed_json` / `invalid_body`."""
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


def form_fields(form: MultiDict[str, str]) -> dict[str, Any]:
    """Multipart form fields as the JSON body would hold them: list fields repeat, metadata is JSON."""
    fields: dict[str, Any] = {}
    for name in form:
        values = form.getlist(name)
        if name in LIST_FIELDS:
            fields[name] = values
        elif name in JSON_FIELDS:
            try:
                fields[name] = json.loads(values[-1])
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ApiProblem(422, JSON_FIELDS[name], f"{name} must be a JSON object string.",
                                 errors=[{"field": name, "message": "not valid JSON"}]) from exc
        else:
            fields[name] = values[-1]
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
