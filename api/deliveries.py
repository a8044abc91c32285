"""/v1/webhook-deliveries: what was sent where, and a way to send it again now."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select, tuple_

from api.auth import current_tenant, require_tenant
from api.jobs import decode_cursor, encode_cursor, parse_limit, parse_status
from api.problems import ApiProblem
from api.services import db, services
from shared.models import WebhookDelivery
from shared.queue import after_finish
from shared.webhooks import FAILED, PENDING, SUCCEEDED, delivery_object, retry_now

bp = Blueprint("deliveries", __name__, url_prefix="/v1/webhook-deliveries")
bp.before_request(require_tenant)


@bp.get("")
def list_deliveries() -> Response:
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == current_tenant().id)
    for name, column in (("job_id", WebhookDelivery.job_id), ("batch_id", WebhookDelivery.batch_id)):
        if request.args.get(name):
            query = query.where(column == request.args[name])
    wanted = parse_status((PENDING, SUCCEEDED, FAILED))
    if wanted:
        query = query.where(WebhookDelivery.status.in_(wanted))
    limit = parse_limit()
    if request.args.get("cursor"):
        created, last = decode_cursor(request.args["cursor"])
        query = query.where(tuple_(WebhookDelivery.created_at, WebhookDelivery.id) < tuple_(created, last))
    rows = db().execute(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                        .limit(limit + 1)).scalars().all()
    page = rows[:limit]
    return jsonify({"object": "list", "data": [delivery_object(r) for r in page],
                    "next_cursor": encode_cursor(page[-1]) if len(rows) > limit else None})


@bp.post("/<delivery_id>/retry")
def retry_delivery(delivery_id: str) -> Response:
    session = db()
    row = session.execute(select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.tenant_id == current_tenant().id)).scalar_one_or_none()
    if row is None:
        raise ApiProblem(404, "not_found", f"No webhook delivery {delivery_id!r}.")
    retry_now(row)
    session.commit()
    svc = services()
    after_finish(svc.celery, svc.sessions, batch_id=None, deliveries=[row.id])
    resp = jsonify(delivery_object(row))
    resp.status_code = 202
    return resp
