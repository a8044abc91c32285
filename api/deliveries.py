"""/v1/webhook-deliveries: what was sent where, and a way to send it again now."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api.auth import current_tenant, require_tenant
from api.openapi import Answers, spec
from api.pagination import page
from api.parsing import parse_status, refuse_unstorable_ids
from api.problems import ApiProblem
from api.schemas import DeliveryListQuery, WebhookDeliveryList, WebhookDeliveryObject
from api.services import db, services
from shared.enums import DeliveryStatus
from shared.followups import Effects, after_commit
from shared.present import delivery_object
from shared.tables import WebhookDelivery
from shared.webhooks import retry_now

bp = Blueprint("deliveries", __name__, url_prefix="/v1/webhook-deliveries")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)


@bp.get("")
@spec.validate(query=DeliveryListQuery, resp=Answers(200, WebhookDeliveryList, "A page of deliveries, newest first.",
                                                     400, 422),
               operation_id="listWebhookDeliveries", tags=["webhooks"], skip_validation=True)
def list_deliveries() -> Response:
    """Webhook deliveries, newest first"""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == current_tenant().id)
    for name, column in (("job_id", WebhookDelivery.job_id), ("batch_id", WebhookDelivery.batch_id)):
        if request.args.get(name):
            query = query.where(column == request.args[name])
    wanted = parse_status(DeliveryStatus)
    if wanted:
        query = query.where(WebhookDelivery.status.in_(wanted))
    return jsonify(page(db(), query, WebhookDelivery, delivery_object))


@bp.post("/<delivery_id>/retry")
@spec.validate(resp=Answers(202, WebhookDeliveryObject, "Queued for delivery now (same webhook-id).", 404),
               operation_id="retryWebhookDelivery", tags=["webhooks"], skip_validation=True)
def retry_delivery(delivery_id: str) -> Response:
    """Deliver again now (same webhook-id)"""
    session = db()
    row = session.execute(select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.tenant_id == current_tenant().id)).scalar_one_or_none()
    if row is None:
        raise ApiProblem(404, "not_found", f"No webhook delivery {delivery_id!r}.")
    retry_now(row)
    session.commit()
    svc = services()
    after_commit(svc.celery, svc.sessions, Effects.of(delivery_ids=[row.id]))
    resp = jsonify(delivery_object(row))
    resp.status_code = 202
    return resp
