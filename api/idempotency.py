"""Idempotency-Key: the first response to a key is stored with the resource it created and
replayed for the key's lifetime; the same key with a different body is a 409."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.problems import ApiProblem
from shared.models import IdempotencyKey

MAX_KEY_LENGTH = 255


def request_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ApiProblem(400, "invalid_idempotency_key", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.")
    return key


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def find(session: Session, *, tenant_id: str, key: str, ttl_s: int) -> IdempotencyKey | None:
    """The live record for a key; an expired one is deleted so the key can be used again."""
    row = session.execute(
        select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
    ).scalar_one_or_none()
    if row is None:
        return None
    if row.created_at < dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ttl_s):
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row.id))
        session.commit()
        return None
    return row


def replay(row: IdempotencyKey, *, route: str, request_hash: str) -> Response:
    if row.route != route or row.request_hash != request_hash:
        raise ApiProblem(
            409, "idempotency_key_reused",
            "This Idempotency-Key was already used with a different request; use a new key.",
        )
    resp = jsonify(row.response_body)
    resp.status_code = row.status_code
    for name, value in (row.headers or {}).items():
        resp.headers[name] = value
    resp.headers["Idempotent-Replayed"] = "true"
    return resp
