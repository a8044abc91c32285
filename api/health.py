"""/healthz (process alive) and /readyz (dependencies answer)."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from api.openapi import Answers, spec
from api.problems import ApiProblem
from api.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@spec.validate(resp=Answers(200, None, "ok", public=True), security={}, operation_id="healthz", tags=["operations"],
               skip_validation=True)
def healthz() -> Response:
    """Process is serving (no dependency checks)"""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@spec.validate(resp=Answers(200, None, "ready", 503, public=True), security={}, operation_id="readyz",
               tags=["operations"], skip_validation=True)
def readyz() -> Response:
    """Postgres, Redis and object storage answer"""
    svc = services()
    checks: dict[str, str] = {}
    try:
        with svc.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["postgres"] = f"down: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(svc.settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"down: {type(exc).__name__}"
    try:
        svc.storage.ping()
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"down: {type(exc).__name__}"
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        raise ApiProblem(503, "dependency_unavailable", f"Not ready: {', '.join(down)} not answering.",
                         errors=[{"field": name, "message": checks[name]} for name in down],
                         headers={"Retry-After": "5"})
    return jsonify({"status": "ready", "checks": checks})
