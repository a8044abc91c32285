"""What a job's fields mean for this tenant: its labels (preset, prompts, a fine-tuned model's own),
its image prompts decoded and keyed for storage, an s3:// input checked against the tenant's buckets,
and the JobSpec the submission service takes. Unlike api/parsing.py (the wire only), these read the
database and the tenant."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from api.auth import current_tenant
from api.parsing import check_image_bytes, decode_base64_image
from api.problems import ApiProblem
from api.schemas import JobParams
from api.services import db, services
from shared import presets, tuned_models
from shared.families import unsupported_fields
from shared.s3uri import input_refusal, parse_s3_uri
from shared.storage import example_key
from shared.submit import JobSpec
from shared.tables import ServedBase


class LabelResolver:
    """A job's labels from its preset and prompts; each preset id is looked up once per request
    (a batch of 100,000 items naming one preset reads it once)."""

    def __init__(self) -> None:
        self._presets: dict[str, presets.PresetDef] = {}
        self._models: dict[str, tuple[dict[str, str] | None, list[dict[str, Any]]]] = {}
        self._bases: dict[str | None, tuple[str | None, str | None]] = {}

    def base(self, model_id: str | None) -> tuple[str | None, str | None]:
        """(the base the job runs on, None for the deployment's default; that base's family, None
        while no worker has served it yet) for the job's `model` (already resolved by model())."""
        if model_id is None:  # the default base; its family only when a field needs it (family())
            return None, None
        if model_id not in self._bases:
            session, settings = db(), services().settings
            base_id: str | None = model_id
            if model_id is not None and model_id != settings.default_base:
                row = tuned_models.current_base(session, model_id, ttl_s=settings.served_base_ttl_s)
                if row is None:  # a tenant's fine-tuned model: its base
                    tuned = tuned_models.find_model(session, current_tenant().id, model_id)
                    base_id = tuned.base_id if tuned is not None else None
            if base_id == settings.default_base:
                base_id = None
            served = session.get(ServedBase, base_id or settings.default_base)
            self._bases[model_id] = (base_id, None if served is None else served.family)
        return self._bases[model_id]

    def model(self, model_id: str | None) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
        """(the job's model_ref, the model's own labels) for `model`: (None, []) for the deployment's
        base model or none; a tenant's fine-tuned model by its current revision; else 422 unknown_model."""
        if model_id is None:
            return None, []
        if model_id not in self._models:
            session, tenant, settings = db(), current_tenant(), services().settings
            if model_id == settings.default_base or tuned_models.current_base(session, model_id,
                                                                ttl_s=settings.served_base_ttl_s) is not None:
                self._models[model_id] = (None, [])
            else:
                row = tuned_models.find_model(session, tenant.id, model_id)
                if row is None:
                    raise tuned_models.UnknownModel(f"No model {model_id!r}: use the deployment's base model or one of "
                                             "yours (GET /v1/models).")
                base = tuned_models.current_base(session, row.base_id, ttl_s=settings.served_base_ttl_s)
                if base is None or (row.base_revision and base.revision and row.base_revision != base.revision):
                    raise tuned_models.BaseNotServed(
                        f"model {model_id!r} was made for {row.base_id} (revision {row.base_revision}), which this "
                        "deployment no longer serves; it runs only on the exact base it was made for")
                labels = [{"name": label["name"], "prompts": list(label["prompts"]), "source": "model",
                           "model_label": index,
                           **({"threshold": label["threshold"]} if label.get("threshold") is not None else {})}
                          for index, label in enumerate(row.labels)]
                self._models[model_id] = ({"id": row.id, "revision": row.revision}, labels)
        return self._models[model_id]

    def __call__(self, preset_id: str | None, prompts: list[str], *, field: str = "prompts",
                 image_prompts: list[dict[str, Any]] | None = None, embed: list[str] | None = None,
                 model: str | None = None, box_prompts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        ref, own = self.model(model)
        if ref is not None and not prompts and preset_id is None and not image_prompts:
            return own  # a fine-tuned model's own labels, at their calibrated thresholds
        if not prompts and preset_id is None and not image_prompts and not embed and not box_prompts:
            raise ApiProblem(422, "invalid_prompts", "Give prompts, a preset, image_prompts, box_prompts or embed.",
                             errors=[{"field": field,
                                      "message": "give prompts, a preset, image_prompts, box_prompts or embed"}])
        found = None
        if preset_id is not None:
            found = self._presets.get(preset_id)
            if found is None:
                found = presets.find(db(), current_tenant().id, preset_id)
                if found is None:
                    raise presets.UnknownPreset(preset_id)
                self._presets[preset_id] = found
        return presets.expand(found, prompts, image_prompts or [], box_prompts or [])


def check_s3_input(uri: str, field: str) -> None:
    """422 invalid_image_s3_uri unless the operator allowed the URI's bucket for this tenant (and, in
    the deployment's own bucket, the key is one of the tenant's uploads)."""
    bucket, key = parse_s3_uri(uri)
    tenant = current_tenant()
    refusal = input_refusal(bucket, key, tenant_id=tenant.id, allowed=tenant.input_buckets,
                            own_bucket=services().settings.s3_bucket)
    if refusal is not None:
        raise ApiProblem(422, "invalid_image_s3_uri", f"{refusal[0].upper()}{refusal[1:]}; an operator allows "
                         "buckets per tenant (clipmask tenant limits --input-bucket).",
                         errors=[{"field": field, "message": refusal}])


class ImagePrompts:
    """A request's image prompts as a job stores them: URLs as given, base64 examples decoded,
    checked (422 invalid_image_prompts) and keyed by content for storage. One per request, so that a
    batch's shared example is decoded and checked once."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[dict[str, Any], bytes]] = {}

    def __call__(self, params: JobParams, *,
                 field: str = "image_prompts") -> tuple[list[dict[str, Any]], dict[str, bytes]]:
        shown: list[dict[str, Any]] = []
        examples: dict[str, bytes] = {}
        for index, prompt in enumerate(params.image_prompts):
            if prompt.image_url is not None:
                shown.append({"label": prompt.label, "image_url": prompt.image_url})
                continue
            assert prompt.image_base64 is not None
            cached = self._seen.get(prompt.image_base64)
            if cached is None:
                where = f"{field}[{index}].image_base64"
                try:
                    data = decode_base64_image(prompt.image_base64)
                    check_image_bytes(data, where)
                except ApiProblem as exc:
                    raise ApiProblem(422, "invalid_image_prompts", f"{where}: {exc.detail}",
                                     errors=[{"field": where, "message": exc.detail}]) from exc
                digest = hashlib.sha256(data).hexdigest()
                key = example_key(tenant_id=current_tenant().id, digest=digest)
                cached = ({"sha256": digest, "bytes": len(data), "key": key}, data)
                self._seen[prompt.image_base64] = cached
            info, data = cached
            shown.append({"label": prompt.label, **info})
            examples[info["key"]] = data
        return shown, examples


def job_labels(resolve: LabelResolver, params: JobParams, image_prompts: list[dict[str, Any]], *,
               field: str = "prompts") -> list[dict[str, Any]]:
    check_family(resolve, params)
    return resolve(params.preset, params.prompts, field=field, image_prompts=image_prompts,
                   embed=[str(e) for e in params.embed], model=params.model,
                   box_prompts=[p.model_dump() for p in params.box_prompts])


def check_family(resolve: LabelResolver, params: JobParams) -> None:
    """422 unsupported_for_model for a field the family of the job's base cannot serve."""
    resolve.model(params.model)  # 422 unknown_model first
    fields = {"image_prompts": bool(params.image_prompts), "box_prompts": bool(params.box_prompts),
              "embed": bool(params.embed)}
    if not any(fields.values()):
        return
    if params.model is None:
        served = db().get(ServedBase, services().settings.default_base)
        family = None if served is None else served.family
    else:
        family = resolve.base(params.model)[1]
    if family is None:
        return  # no worker served this base yet: the worker checks it (jobs stay queued until one does)
    refused = unsupported_fields(family, fields)
    if refused:
        name = params.model or services().settings.default_base
        raise ApiProblem(422, "unsupported_for_model", f"{', '.join(refused)}: model {name!r} ({family}) cannot "
                         "serve it; GET /v1/models lists each base's capabilities.",
                         errors=[{"field": f, "message": f"not supported by the {family} family"} for f in refused])


def check_boxes_inside(params: JobParams, data: bytes) -> None:
    """422 invalid_box_prompts for a box past the edges of an image the API holds (base64, upload);
    an image by URL is checked when the worker has it (the job fails with the same code)."""
    if not params.box_prompts:
        return
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(data)).size  # the header only
    except Exception:  # noqa: BLE001 - the worker's decode says what is wrong with the image
        return
    for index, prompt in enumerate(params.box_prompts):
        for kind in ("boxes", "negative_boxes"):
            for box in getattr(prompt, kind):
                if box[2] > width or box[3] > height:
                    where = f"box_prompts[{index}].{kind}"
                    raise ApiProblem(422, "invalid_box_prompts", f"{where}: {box} is outside the {width}x{height} "
                                     "image", errors=[{"field": where, "message": "outside the image"}])


def job_spec(params: JobParams, *, labels: list[dict[str, Any]], input: dict[str, Any], image: bytes | None = None,
             filename: str | None = None, image_prompts: list[dict[str, Any]] | None = None,
             examples: dict[str, bytes] | None = None, model_ref: dict[str, str] | None = None,
             base: str | None = None) -> JobSpec:
    """What the submission service takes, from validated fields and the image source. A job that gives
    its own `threshold` applies it to every label: its preset labels' own thresholds are dropped."""
    events = None if params.webhook_events is None else [str(e) for e in params.webhook_events]
    if "threshold" in params.model_fields_set:
        labels = [{k: v for k, v in label.items() if k != "threshold"} for label in labels]
    return JobSpec(prompts=params.prompts, threshold=params.threshold, input=input, metadata=params.metadata,
                   webhook_url=params.webhook_url, webhook_events=events, image=image, filename=filename,
                   labels=labels, preset=params.preset, outputs=[str(o) for o in params.outputs],
                   image_prompts=image_prompts or [], examples=examples or {}, embed=[str(e) for e in params.embed],
                   model_ref=model_ref, refine=str(params.refine), base=base)
