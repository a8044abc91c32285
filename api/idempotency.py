"""Idempotency-Key on creates: the header, the request's fingerprint, and the answer as a response.

The service (`shared.submit`) stores the first answer with what it created and replays it for
the key's lifetime; the same key with a different body is 409 `idempotency_key_reused`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy.orm import Session

from api.auth import current_tenant
from api.openapi import LOCATION, REPLAYED
from api.parsing import text_ok
from api.problems import ApiProblem
from api.services import db, services
from shared.submit import Accepted, Idempotency, remember_answer, replay_answer

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


# What a 201 create (a preset, a model) is given to keep its answer in its own transaction: called
# with the session and the object's body just before the commit.
Remember = Callable[[Session, dict[str, Any]], None]


def create_once(route: str, request_hash: str, create: Callable[[Remember | None], dict[str, Any]], *,
                location: Callable[[dict[str, Any]], str], exists: type[Exception]) -> Response:
    """A 201 create under the request's Idempotency-Key: the key's first answer again when it was
    seen (another body: 409 idempotency_key_reused), else `create`, which keeps its answer in the
    transaction that creates it. A concurrent request with the same key that lost the race (its
    commit failed as `exists`) answers as the winner did."""
    key = idempotency(route, request_hash)
    tenant_id, ttl = current_tenant().id, services().settings.idempotency_ttl_s
    if key is not None and (replayed := replay_answer(db(), tenant_id=tenant_id, idempotency=key, ttl_s=ttl)):
        return respond(replayed)

    def remember(session: Session, body: dict[str, Any]) -> None:
        assert key is not None
        remember_answer(session, tenant_id=tenant_id, idempotency=key, status_code=201, body=body,
                        headers={"Location": location(body)})

    try:
        body = create(remember if key is not None else None)
    except exists:
        if key is None or (replayed := replay_answer(db(), tenant_id=tenant_id, idempotency=key, ttl_s=ttl)) is None:
            raise
        return respond(replayed)
    return respond(Accepted(201, body, {"Location": location(body)}))
