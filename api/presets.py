"""/v1/presets: the built-in label sets and the tenant's own (shared/presets.py holds the logic)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from api.auth import current_tenant, require_tenant
from api.idempotency import ACCEPTED_HEADERS, Remember, create_once, fingerprint
from api.openapi import Answers, spec
from api.pagination import opaque_cursor, parse_limit, read_cursor, stored_id
from api.parsing import json_body, refuse_unstorable_ids
from api.problems import ApiProblem
from api.schemas import (
    PRESET_FIELD_CODES,
    IdempotencyHeader,
    PageQuery,
    PresetCreate,
    PresetList,
    PresetObject,
    validation_problem,
)
from api.services import db, services
from shared import presets

log = logging.getLogger(__name__)

bp = Blueprint("presets", __name__, url_prefix="/v1/presets")
bp.before_request(require_tenant)
bp.before_request(refuse_unstorable_ids)


def _after(position: list[Any]) -> tuple[bool, str]:
    builtin, last_id = position
    if not isinstance(builtin, bool):
        raise ValueError("not a position")
    return builtin, stored_id(last_id)


@bp.get("")
@spec.validate(query=PageQuery, resp=Answers(200, PresetList, "Built-ins first, then yours by id.", 400, 422),
               operation_id="listPresets", tags=["presets"], skip_validation=True)
def list_presets() -> Response:
    """List presets

    Built-ins first, then yours by id, `limit` (1 to 100, default 20) a page; `next_cursor` gives
    the next page, null on the last.
    """
    limit = parse_limit()
    cursor = request.args.get("cursor")
    after = read_cursor(cursor, _after) if cursor else None
    found, more = presets.list_page(db(), current_tenant().id, after=after, limit=limit)
    next_cursor = opaque_cursor([found[-1].builtin, found[-1].id]) if more else None
    return jsonify({"object": "list", "data": [p.as_object() for p in found], "next_cursor": next_cursor})


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
@spec.validate(json=PresetCreate, headers=IdempotencyHeader,
               resp=Answers(201, PresetObject, "Created.", 400, 409, 413, 415, 422, headers=ACCEPTED_HEADERS),
               operation_id="createPreset", tags=["presets"], skip_validation=True)
def create_preset() -> Response:
    """Create a preset of your own

    1 to 32 labels, 1 to 8 phrasings each; the label's mask comes from the mean of its phrasings'
    text embeddings. A built-in id or one you already have: 409 preset_exists; a tenant with
    `max_presets_per_tenant` presets (100 unless the operator says otherwise): 409
    preset_limit_reached.
    """
    body = json_body(PRESET_FIELD_CODES)
    try:
        parsed = PresetCreate.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc, PRESET_FIELD_CODES) from exc
    labels = [{"name": label.name, "prompts": label.prompts,
               **({"threshold": label.threshold} if label.threshold is not None else {})} for label in parsed.labels]

    def create(remember: Remember | None) -> dict[str, Any]:
        created = presets.create(db(), current_tenant().id, parsed.id, labels,
                                 cap=services().settings.max_presets_per_tenant, remember=remember)
        log.info("preset created", extra={"tenant_id": current_tenant().id, "preset": parsed.id})
        return created.as_object()

    return create_once("presets.create", fingerprint(body), create, location=lambda made: f"/v1/presets/{made['id']}",
                       exists=presets.PresetExists)


@bp.delete("/<preset_id>")
@spec.validate(resp=Answers(204, None, "Deleted; jobs that used it keep their labels.", 404, 409),
               operation_id="deletePreset", tags=["presets"], skip_validation=True)
def delete_preset(preset_id: str) -> Response:
    """Delete a preset of your own (built-ins: 409 preset_read_only)"""
    if not presets.delete(db(), current_tenant().id, preset_id):
        raise ApiProblem(404, "not_found", f"No preset {preset_id!r}.")
    return Response(status=204)
