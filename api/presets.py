"""/v1/presets: the built-in label sets and the tenant's own (shared/presets.py holds the logic)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from api.auth import current_tenant, require_tenant
from api.openapi import Answers, spec
from api.parsing import json_body, refuse_unstorable_ids
from api.problems import ApiProblem
from api.schemas import PRESET_FIELD_CODES, PresetCreate, PresetList, PresetObject, validation_problem
from api.services import db
from shared import presets

log = logging.getLogger(__name__)

bp = Blueprint("presets", __name__, url_prefix="/v1/presets")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)


@bp.get("")
@spec.validate(resp=Answers(200, PresetList, "Built-ins first, then yours by id."), operation_id="listPresets",
               tags=["presets"], skip_validation=True)
def list_presets() -> Response:
    """List presets"""
    found = presets.list_all(db(), current_tenant().id)
    return jsonify({"object": "list", "data": [p.as_object() for p in found]})


@bp.get("/<preset_id>")
@spec.validate(resp=Answers(200, PresetObject, "The preset.", 404), operation_id="getPreset", tags=["presets"],
               skip_validation=True)
def get_preset(preset_id: str) -> Response:
    """Get a preset"""
    found = presets.find(db(), current_tenant().id, preset_id)
    if found is None:
        raise ApiProblem(404, "not_found", f"No preset {preset_id!r}.")
    return jsonify(found.as_object())


@bp.post("")
@spec.validate(json=PresetCreate, resp=Answers(201, PresetObject, "Created.", 400, 409, 413, 415, 422),
               operation_id="createPreset", tags=["presets"], skip_validation=True)
def create_preset() -> Response:
    """Create a preset of your own

    1 to 32 labels, 1 to 8 phrasings each; the label's mask comes from the mean of its phrasings'
    text embeddings. A built-in id or one you already have: 409 preset_exists.
    """
    body = json_body(PRESET_FIELD_CODES)
    try:
        parsed = PresetCreate.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc, PRESET_FIELD_CODES) from exc
    labels = [{"name": label.name, "prompts": label.prompts} for label in parsed.labels]
    created = presets.create(db(), current_tenant().id, parsed.id, labels)
    log.info("preset created", extra={"tenant_id": current_tenant().id, "preset": parsed.id})
    resp = jsonify(created.as_object())
    resp.status_code = 201
    resp.headers["Location"] = f"/v1/presets/{created.id}"
    return resp


@bp.delete("/<preset_id>")
@spec.validate(resp=Answers(204, None, "Deleted; jobs that used it keep their labels.", 404, 409),
               operation_id="deletePreset", tags=["presets"], skip_validation=True)
def delete_preset(preset_id: str) -> Response:
    """Delete a preset of your own (built-ins: 409 preset_read_only)"""
    if not presets.delete(db(), current_tenant().id, preset_id):
        raise ApiProblem(404, "not_found", f"No preset {preset_id!r}.")
    return Response(status=204)
