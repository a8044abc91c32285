"""/v1/models: the deployment's base model(s) and the tenant's fine-tuned decoders (shared/tuned_models.py)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api.auth import current_tenant, require_tenant
from api.idempotency import ACCEPTED_HEADERS, Remember, create_once, fingerprint
from api.openapi import Answers, spec
from api.parsing import is_multipart_request, refuse_unstorable_ids
from api.problems import ApiProblem
from api.schemas import IdempotencyHeader, ModelCreateMultipart, ModelList, ModelObject
from api.services import db, services
from shared import tuned_models
from shared.tables import TunedModel

log = logging.getLogger(__name__)

bp = Blueprint("models", __name__, url_prefix="/v1/models")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)


@bp.get("")
@spec.validate(resp=Answers(200, ModelList, "The default base first, the other bases, then yours by id."),
               operation_id="listModels",
               tags=["models"], skip_validation=True)
def list_models() -> Response:
    """List models

    The deployment's base models, read-only (the default base first; each with its family and
    capabilities), then your fine-tuned decoders.
    """
    session, settings = db(), services().settings
    bases = sorted(tuned_models.current_bases(session, ttl_s=settings.served_base_ttl_s),
                   key=lambda b: (b.id != settings.default_base, b.id))
    own = session.execute(select(TunedModel).where(TunedModel.tenant_id == current_tenant().id)
                          .order_by(TunedModel.id)).scalars()
    data = [tuned_models.base_object(b, live_s=settings.served_base_live_s) for b in bases] + [
        tuned_models.model_object(m) for m in own]
    return jsonify({"object": "list", "data": data})


@bp.get("/<path:model_id>")
@spec.validate(resp=Answers(200, ModelObject, "The model.", 404), operation_id="getModel", tags=["models"],
               skip_validation=True)
def get_model(model_id: str) -> Response:
    """Get a model"""
    session, settings = db(), services().settings
    base = tuned_models.current_base(session, model_id, ttl_s=settings.served_base_ttl_s)
    if base is not None:
        return jsonify(tuned_models.base_object(base, live_s=settings.served_base_live_s))
    found = tuned_models.find_model(session, current_tenant().id, model_id)
    if found is None:
        raise ApiProblem(404, "not_found", f"No model {model_id!r}.")
    return jsonify(tuned_models.model_object(found))


@bp.post("")
@spec.validate(form=ModelCreateMultipart, headers=IdempotencyHeader,
               resp=Answers(201, ModelObject, "Stored; jobs may name it.", 400, 409, 413, 415, 422,
                            headers=ACCEPTED_HEADERS), operation_id="createModel", tags=["models"],
               skip_validation=True)
def create_model() -> Response:
    """Upload a fine-tuned model

    Multipart: `id`, and the folder `clipmask finetune` wrote as file parts `manifest`
    (clipmask-model.json) and `weights` (decoder.safetensors). Checked before it is stored: format
    version, a base this deployment serves (422 unsupported_base_model), tensors exactly that base's
    decoder (422 invalid_model_weights); a taken id is 409 model_exists, past the per-tenant limit
    409 model_limit_reached.
    """
    if not is_multipart_request():
        raise ApiProblem(415, "unsupported_media_type",
                         "Send multipart/form-data with the id field and the manifest and weights file parts.")
    missing = [name for name in ("manifest", "weights") if name not in request.files]
    if missing or not request.form.get("id"):
        fields = missing + ([] if request.form.get("id") else ["id"])
        raise ApiProblem(422, "invalid_model_upload", f"Missing: {', '.join(fields)}.",
                         errors=[{"field": name, "message": "required"} for name in fields])
    tenant = current_tenant()
    svc = services()
    model_id, manifest, weights = request.form["id"], request.files["manifest"].read(), request.files["weights"].read()

    def create(remember: Remember | None) -> dict[str, Any]:
        created = tuned_models.create_model(db(), svc.storage, tenant_id=tenant.id, model_id=model_id,
                                            manifest=manifest, weights=weights, remember=remember,
                                            cap=svc.settings.max_models_per_tenant,
                                            base_ttl_s=svc.settings.served_base_ttl_s)
        log.info("model created", extra={"tenant_id": tenant.id, "model": created.id, "revision": created.revision})
        return tuned_models.model_object(created)

    request_hash = fingerprint({"id": model_id, "manifest": hashlib.sha256(manifest).hexdigest(),
                                "weights": hashlib.sha256(weights).hexdigest()})
    return create_once("models.create", request_hash, create, location=lambda made: f"/v1/models/{made['id']}",
                       exists=tuned_models.ModelExists)


@bp.delete("/<path:model_id>")
@spec.validate(resp=Answers(204, None, "Deleted; finished jobs keep what they ran; queued ones naming it fail with "
                                       "model_not_found.", 404, 409), operation_id="deleteModel", tags=["models"],
               skip_validation=True)
def delete_model(model_id: str) -> Response:
    """Delete a fine-tuned model (the base: 409 model_read_only)"""
    if not tuned_models.delete_model(db(), services().storage, current_tenant().id, model_id):
        raise ApiProblem(404, "not_found", f"No model {model_id!r}.")
    return Response(status=204)
