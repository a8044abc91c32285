"""Fine-tuned models as a tenant resource: the bases this deployment serves, and tenants' decoders.

A worker that loads its checkpoint records it as a served base (`served_bases`: id, revision, the
decoder's tensor names and shapes, the projection size). `POST /v1/models` checks an upload
against that record before anything is stored: a known format version, a base this deployment
serves, a safetensors file whose tensors are exactly that decoder's names and shapes (read from
the file's header; no tensor is loaded in the API), at most `max_models_per_tenant` per tenant.
The weights go to object storage under the tenant's prefix, keyed by their digest (the model's
revision), so a job that asked for a revision keeps it and a worker never mixes weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.clock import isoformat, utcnow
from shared.errors import ClipmaskError
from shared.storage import ObjectStorage
from shared.tables import ServedBase, TunedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_ID = re.compile(r"^[a-z0-9._-]{1,64}$")
LABEL_EMBEDDINGS = "label_embeddings"
MAX_LABELS = 32
MAX_MANIFEST_BYTES = 1 << 20
# Postgres stores neither NUL in text/jsonb nor lone UTF-16 surrogates
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> bool:
    if isinstance(value, str):
        return not UNSTORABLE.search(value)
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


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
                projection_dim: int) -> None:
    """Upsert what a worker loaded (each worker does so at start; the last one wins, all agree)."""
    row = {"id": model_id, "revision": revision, "decoder": decoder, "projection_dim": projection_dim,
           "updated_at": utcnow()}
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


# What a job on a CLIPSeg base may ask for beyond prompts (the contract's capability names)
CLIPSEG_CAPABILITIES = ["image_prompts", "embed", "finetune"]


def base_object(base: ServedBase, *, live_s: float) -> dict[str, Any]:
    served = base.updated_at > utcnow() - _seconds(live_s)
    return {"id": base.id, "object": "model", "builtin": True, "base": None, "revision": base.revision,
            "labels": [], "metrics": {}, "created_at": isoformat(base.updated_at), "family": "clipseg",
            "capabilities": list(CLIPSEG_CAPABILITIES), "served": served}


# ---- uploads ---------------------------------------------------------------------------------------

# The float dtypes a CLIPSeg decoder's weights come in (the base's are F32; half precision loads into
# it too). Anything else (integers, 8-bit floats, a name safetensors doesn't know) is refused: the
# worker's load_state_dict would fail or quietly cast.
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# A decoder declares tens of tensors: its header is a few KB. A 15.6 MiB header cost an API thread
# 134 MiB and seconds of CPU to parse.
MAX_HEADER_BYTES = 256 << 10
# the exponent bits of each dtype, as the unsigned integer of the same width: all ones is NaN or infinity
_EXPONENT = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}


def safetensors_header(data: bytes) -> dict[str, Any]:
    """The tensors a safetensors file declares ({name: {"dtype", "shape", "data_offsets"}}), checked as
    the worker's loader would read them: a bounded header, known float dtypes, each tensor's byte span
    exactly its shape times its dtype's size, spans back to back without overlap or gap up to the end
    of the file, and every value finite. InvalidWeights for anything else."""
    if len(data) < 8:
        raise InvalidWeights("weights: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise InvalidWeights("weights: not a safetensors file (its header length runs past the file)")
    if size > MAX_HEADER_BYTES:
        raise InvalidWeights(f"weights: the header is {size} bytes; a decoder's is under {MAX_HEADER_BYTES}")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError) as exc:
        raise InvalidWeights("weights: not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise InvalidWeights("weights: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and all(type(n) is int and n >= 0 for n in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(type(n) is int and n >= 0 for n in info["data_offsets"])):
            raise InvalidWeights(f"weights: tensor {name!r} is not described as safetensors describes tensors")
        dtype = info.get("dtype")
        if dtype not in DTYPE_BYTES:
            raise InvalidWeights(f"weights: tensor {name!r} has dtype {str(dtype)[:20]!r}; a decoder's are one of "
                                 f"{', '.join(DTYPE_BYTES)}")
        start, end = info["data_offsets"]
        if end - start != math.prod(info["shape"]) * DTYPE_BYTES[dtype]:
            raise InvalidWeights(f"weights: tensor {name!r} spans {end - start} bytes, its shape {info['shape']} "
                                 f"of {dtype} needs {math.prod(info['shape']) * DTYPE_BYTES[dtype]}")
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise InvalidWeights(f"weights: tensor {name!r} " + ("overlaps another" if start < at else
                                                                 "leaves a gap before it"))
        at = end
    if 8 + size + at != len(data):
        raise InvalidWeights("weights: the file's length does not match its tensors (truncated or padded)")
    body = memoryview(data)[8 + size:]
    for start, end, name in spans:
        kind, exponent = _EXPONENT[header[name]["dtype"]]
        values = np.frombuffer(body[start:end], dtype=kind)
        if np.any((values & kind(exponent)) == kind(exponent)):
            raise InvalidWeights(f"weights: tensor {name!r} holds NaN or infinity")
    return header


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: bytes) -> Any:
    """JSON as the standard has it: NaN, Infinity and numbers past a double's range (1e400) are refused
    (Python's json takes them; Postgres' jsonb refuses them, which made a create answer 500)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_number)


@dataclass(frozen=True)
class Upload:
    manifest: dict[str, Any]
    labels: list[dict[str, Any]]
    revision: str
    prompt_tuning: bool


def check_upload(session: Session, manifest_bytes: bytes, weights: bytes, *, base_ttl_s: float = 86_400) -> Upload:
    """The upload as it will be stored, or the ModelError that says what is wrong with it."""
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"manifest: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = strict_json(manifest_bytes)
    except (ValueError, RecursionError) as exc:
        raise InvalidManifest(f"manifest: not JSON (upload the folder's clipmask-model.json): {exc}"[:300]) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise InvalidManifest(f"manifest: format {found!r} is not {FORMAT_VERSION}")
    if not _storable(manifest):
        raise InvalidManifest("manifest: holds a NUL character or a lone surrogate")
    base = manifest.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("id"), str):
        raise InvalidManifest("manifest: no base model id")
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS:
        raise InvalidManifest(f"manifest: labels must be a list of 1 to {MAX_LABELS} {{name, prompts}}")
    clean = []
    for i, label in enumerate(labels):
        ok = (isinstance(label, dict) and isinstance(label.get("name"), str) and 0 < len(label["name"]) <= 200
              and isinstance(label.get("prompts"), list) and 1 <= len(label["prompts"]) <= 8
              and all(isinstance(p, str) and 0 < len(p) <= 200 for p in label["prompts"]))
        threshold = label.get("threshold") if isinstance(label, dict) else None
        if not ok or (threshold is not None and not (isinstance(threshold, int | float) and 0 < threshold < 1)):
            raise InvalidManifest(f"manifest: labels[{i}] must be {{name, prompts: 1 to 8 strings, threshold?}}")
        clean.append({"name": label["name"], "prompts": list(label["prompts"]),
                      **({"threshold": float(threshold)} if threshold is not None else {})})
    served = current_base(session, base["id"], ttl_s=base_ttl_s)
    if served is None:
        names = ", ".join(b.id for b in current_bases(session, ttl_s=base_ttl_s)) or "none yet: start a worker"
        raise UnsupportedBase(f"manifest: base {base['id']!r} is not a model this deployment serves ({names})")
    if base.get("revision") and served.revision and base["revision"] != served.revision:
        raise UnsupportedBase(f"manifest: trained on revision {base['revision']} of {base['id']}, this deployment "
                              f"serves {served.revision}")
    header = safetensors_header(weights)
    embeddings = header.pop(LABEL_EMBEDDINGS, None)
    want = {name: list(shape) for name, shape in served.decoder.items()}
    got = {name: list(info["shape"]) for name, info in header.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise InvalidWeights(f"weights: the tensors are not {base['id']}'s decoder (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
    for name, shape in want.items():
        if got[name] != shape:
            raise InvalidWeights(f"weights: {name} is {got[name]}, {base['id']}'s decoder has {shape}")
    if embeddings is not None and list(embeddings["shape"]) != [len(clean), served.projection_dim]:
        raise InvalidWeights(f"weights: label_embeddings are {embeddings['shape']}, expected "
                             f"{[len(clean), served.projection_dim]}")
    return Upload(manifest, clean, "sha256:" + hashlib.sha256(weights).hexdigest(), embeddings is not None)


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
