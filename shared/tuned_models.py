"""Fine-tuned models as a tenant resource: the bases this deployment serves, and tenants' decoders.

A worker that loads its checkpoint records it as a served base (`served_bases`: id, revision, the
decoder's tensor names and shapes, the projection size). `POST /v1/models` checks an upload
against that record before anything is stored: the model folder's rules (shared/modelfile.py: the
format, the labels, a safetensors file whose tensors are exactly that decoder's names and shapes,
finite, read without torch), a base this deployment serves now, at most `max_models_per_tenant`
per tenant.
The weights go to object storage under the tenant's prefix, keyed by their digest (the model's
revision), so a job that asked for a revision keeps it and a worker never mixes weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import modelfile
from shared.clock import isoformat, utcnow
from shared.errors import ClipmaskError
from shared.families import CAPABILITIES
from shared.storage import ObjectStorage
from shared.tables import ServedBase, TunedModel

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"^[a-z0-9._-]{1,64}$")


class ModelError(ClipmaskError):
    status = 422
    field = "model"


class InvalidModelId(ModelError):
    code, field = "invalid_model_id", "id"


class InvalidManifest(ModelError):
    code, field = "invalid_model_manifest", "manifest"


class UnsupportedBase(ModelError):
    code, field = "unsupported_base_model", "manifest"


class BaseNotServed(ModelError):
    """A job names a fine-tuned model whose exact base (id and revision) no worker serves now."""

    code, field = "unsupported_base_model", "model"


class InvalidWeights(ModelError):
    code, field = "invalid_model_weights", "weights"


class ModelExists(ModelError):
    code, status, field = "model_exists", 409, "id"


class ModelLimitReached(ModelError):
    code, status, field = "model_limit_reached", 409, "id"


class ModelReadOnly(ModelError):
    code, status = "model_read_only", 409


class UnknownModel(ModelError):
    code = "unknown_model"


def weights_key(*, tenant_id: str, revision: str) -> str:
    return f"models/{tenant_id}/{revision.removeprefix('sha256:')}.safetensors"


# ---- served bases --------------------------------------------------------------------------------

def record_base(session: Session, *, model_id: str, revision: str | None, decoder: dict[str, list[int]],
                projection_dim: int, family: str = "clipseg") -> None:
    """Upsert what a worker loaded (each worker does so at start; the last one wins, all agree)."""
    row = {"id": model_id, "revision": revision, "decoder": decoder, "projection_dim": projection_dim,
           "family": family, "updated_at": utcnow()}
    session.execute(insert(ServedBase).values(row).on_conflict_do_update(index_elements=["id"], set_=row))


def touch_base(session: Session, *, model_id: str) -> None:
    """A live worker still serves this base (its heartbeat)."""
    session.execute(update(ServedBase).where(ServedBase.id == model_id).values(updated_at=func.now()))


def current_bases(session: Session, *, ttl_s: float) -> list[ServedBase]:
    """The bases a worker served within `ttl_s`: the ones listed and accepted."""
    return list(session.execute(select(ServedBase).where(ServedBase.updated_at > func.now() - _seconds(ttl_s))
                                .order_by(ServedBase.id)).scalars())


def current_base(session: Session, model_id: str, *, ttl_s: float) -> ServedBase | None:
    return session.execute(select(ServedBase).where(
        ServedBase.id == model_id, ServedBase.updated_at > func.now() - _seconds(ttl_s))).scalar_one_or_none()


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def base_object(base: ServedBase, *, live_s: float) -> dict[str, Any]:
    served = base.updated_at > utcnow() - _seconds(live_s)
    return {"id": base.id, "object": "model", "builtin": True, "base": None, "revision": base.revision,
            "labels": [], "metrics": {}, "created_at": isoformat(base.updated_at), "family": base.family,
            "capabilities": list(CAPABILITIES.get(base.family, [])), "served": served}


# ---- uploads ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upload:
    manifest: dict[str, Any]
    labels: list[dict[str, Any]]
    revision: str
    prompt_tuning: bool


def check_upload(session: Session, manifest_bytes: bytes, weights: bytes, *, base_ttl_s: float = 86_400) -> Upload:
    """The upload as it will be stored, or the ModelError that says what is wrong with it: the model
    folder's rules (shared/modelfile.py, the loader's and the writer's too), then a base this
    deployment serves now, at the revision the model was trained on, whose decoder the tensors are."""
    try:
        manifest = modelfile.parse_manifest(manifest_bytes)
        base_id = manifest.base_id
        served = current_base(session, base_id, ttl_s=base_ttl_s)
        if served is None:
            names = ", ".join(b.id for b in current_bases(session, ttl_s=base_ttl_s)) or "none yet: start a worker"
            raise UnsupportedBase(f"manifest: base {base_id!r} is not a model this deployment serves ({names})")
        if served.family != "clipseg":
            raise UnsupportedBase(f"manifest: base {base_id!r} is a {served.family} model; fine-tuning is for "
                                  "clipseg bases")
        if manifest.base_revision and served.revision and manifest.base_revision != served.revision:
            raise UnsupportedBase(f"manifest: trained on revision {manifest.base_revision} of {base_id}, this "
                                  f"deployment serves {served.revision}")
        header = modelfile.check_weights(weights)
        prompt_tuning = modelfile.check_against_base(header, len(manifest.labels), decoder=served.decoder,
                                                     projection_dim=served.projection_dim, base_id=base_id)
    except modelfile.InvalidModelFile as exc:
        raise (InvalidManifest if exc.part == "manifest" else InvalidWeights)(str(exc)) from exc
    return Upload(manifest.data, manifest.labels, "sha256:" + hashlib.sha256(weights).hexdigest(), prompt_tuning)


def _models_lock(session: Session, tenant_id: str) -> None:
    """Serializes a tenant's model creates and deletes (the count under the cap, and the content-
    addressed weights that models with the same bytes share) until the transaction ends."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext("clipmask.models:" + tenant_id))))


def _unused(session: Session, tenant_id: str, key: str) -> bool:
    return not session.execute(select(func.count()).select_from(TunedModel).where(
        TunedModel.tenant_id == tenant_id, TunedModel.weights_key == key)).scalar_one()


def create_model(session: Session, storage: ObjectStorage, *, tenant_id: str, model_id: str, manifest: bytes,
                 weights: bytes, cap: int, remember: Callable[[Session, dict[str, Any]], None] | None = None,
                 base_ttl_s: float = 86_400) -> TunedModel:
    """Check, store and record a tenant's model. The weights are stored only once every check has
    passed, under the tenant's models lock; a create that fails after that deletes them again unless
    another model of the tenant has the same bytes. `remember` keeps the answer (an Idempotency-Key's)
    in the same commit."""
    if not MODEL_ID.match(model_id):
        raise InvalidModelId("id: 1 to 64 of a-z, 0-9, '.', '_' and '-'")
    if session.get(ServedBase, model_id) is not None:
        raise ModelExists(f"{model_id!r} is a base model of this deployment; choose another id")
    upload = check_upload(session, manifest, weights, base_ttl_s=base_ttl_s)
    _models_lock(session, tenant_id)
    if session.get(TunedModel, (tenant_id, model_id)) is not None:
        raise ModelExists(f"you already have a model {model_id!r}; delete it first or choose another id")
    count = session.execute(select(func.count()).select_from(TunedModel)
                            .where(TunedModel.tenant_id == tenant_id)).scalar_one()
    if count >= cap:
        raise ModelLimitReached(f"you have {count} models, the most a tenant may have; delete one first")
    key = weights_key(tenant_id=tenant_id, revision=upload.revision)
    stored_here = _unused(session, tenant_id, key)  # else another model of the tenant has these bytes
    metrics = upload.manifest.get("metrics") if isinstance(upload.manifest.get("metrics"), dict) else {}
    row = TunedModel(tenant_id=tenant_id, id=model_id, revision=upload.revision, base_id=upload.manifest["base"]["id"],
                     base_revision=upload.manifest["base"].get("revision"), labels=upload.labels,
                     metrics=metrics, prompt_tuning=upload.prompt_tuning, weights_key=key,
                     bytes=len(weights), created_at=utcnow())
    session.add(row)
    if remember is not None:
        remember(session, model_object(row))
    storage.put(key, weights, content_type="application/octet-stream")  # content-addressed: same bytes, same key
    try:
        session.commit()
    except BaseException as exc:
        session.rollback()
        if stored_here:
            _forget_weights(session, storage, tenant_id, key)
        if isinstance(exc, IntegrityError):
            raise ModelExists(f"you already have a model {model_id!r}") from exc
        raise
    return row


def _forget_weights(session: Session, storage: ObjectStorage, tenant_id: str, key: str) -> None:
    """Delete weights a failed create stored, unless a model committed meanwhile uses them."""
    try:
        _models_lock(session, tenant_id)
        if _unused(session, tenant_id, key):
            storage.delete([key])
        session.commit()
    except Exception:  # the create's own error is what the caller must see
        session.rollback()
        log.warning("could not delete the weights of a failed model create", extra={"key": key}, exc_info=True)


def model_object(model: TunedModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "builtin": False,
            "base": {"id": model.base_id, "revision": model.base_revision}, "revision": model.revision,
            "labels": [dict(label) for label in model.labels], "metrics": model.metrics,
            "created_at": isoformat(model.created_at)}


def find_model(session: Session, tenant_id: str, model_id: str) -> TunedModel | None:
    return session.get(TunedModel, (tenant_id, model_id))


def delete_model(session: Session, storage: ObjectStorage, tenant_id: str, model_id: str) -> bool:
    """Delete a tenant's model (and its weights, when no other model of the tenant has the same)."""
    if session.get(ServedBase, model_id) is not None:
        raise ModelReadOnly(f"{model_id!r} is a base model of this deployment; it can't be deleted")
    _models_lock(session, tenant_id)  # a create of the same bytes can't commit between the count and the delete
    row = session.get(TunedModel, (tenant_id, model_id))
    if row is None:
        session.rollback()
        return False
    key = row.weights_key
    session.delete(row)
    session.flush()
    if _unused(session, tenant_id, key):
        storage.delete([key])  # before the commit: if it fails, the row stays and the delete can be retried
    session.commit()
    return True
