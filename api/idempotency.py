"""Idempotency-Key on creates: the header, the request's fingerprint, and the answer as a response.

The service (`shared.submit`) stores the first answer with what it created and replays it for
the key's lifetime; the same key with a different body is 409 `idempotency_key_reused`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flask import Response, jsonify, request

from api.openapi import LOCATION, REPLAYED
from api.parsing import text_ok
from api.problems import ApiProblem
from shared.submit import Accepted, Idempotency

MAX_KEY_LENGTH = 255
ACCEPTED_HEADERS = {**LOCATION, **REPLAYED}


def idempotency(route: str, request_hash: str) -> Idempotency | None:
    """The request's Idempotency-Key for `route`, or None; 400 for an empty or overlong key."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not text_ok(key):
        raise ApiProblem(400, "invalid_idempotency_key",
                         f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters, without NUL.")
    return Idempotency(key=key, route=route, fingerprint=request_hash)


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def respond(accepted: Accepted) -> Response:
    resp = jsonify(accepted.body)
    resp.status_code = accepted.status_code
    for name, value in accepted.headers.items():
        resp.headers[name] = value
    if accepted.replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp
