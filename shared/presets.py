"""Presets: named label sets, several phrasings per label (prompt ensembling).

A label's mask comes from the mean of its phrasings' text embeddings (worker/engine/fast.py
`ensemble`), as CLIP's zero-shot classifiers average "a photo of a {}" templates. Phrasings
here name the garment or body part several ways that catalog photos and CLIP's captions use,
so that one unlucky wording does not decide the mask.

Built-ins live in code and can't be edited; a tenant's own presets live in Postgres (`presets`).
A job stores its labels expanded (`Job.labels`), so editing or deleting a preset never changes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.errors import ClipmaskError
from shared.tables import Preset

MAX_LABELS = 32  # per job, preset labels and prompts together
MAX_PRESET_LABELS = 32
MAX_PHRASINGS = 8
MAX_LABEL_NAME = 64
PRESET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

BUILTIN: dict[str, list[dict[str, Any]]] = {
    "clothing": [
        {"name": "upper_body", "prompts": [
            "a shirt", "a t-shirt", "a blouse", "a sweater", "a jacket", "a top worn on the upper body"]},
        {"name": "lower_body", "prompts": [
            "pants", "trousers", "jeans", "a skirt", "shorts", "clothing worn on the legs"]},
        {"name": "full_body", "prompts": [
            "a dress", "a jumpsuit", "a long gown", "overalls", "a one-piece outfit covering the whole body"]},
    ],
    # The 17 foreground classes of ATR / human_parsing_dataset, in its label order. CLIPSeg has no
    # notion of the person's left and right beyond the words, so those pairs are best effort.
    "human_parsing": [
        {"name": "hat", "prompts": ["a hat", "a cap", "a beanie", "headwear"]},
        {"name": "hair", "prompts": ["hair", "a person's hair", "a hairstyle"]},
        {"name": "sunglasses", "prompts": ["sunglasses", "glasses", "eyewear on a face"]},
        {"name": "upper_clothes", "prompts": ["a shirt", "a top", "a jacket", "a sweater", "upper body clothing"]},
        {"name": "skirt", "prompts": ["a skirt", "a miniskirt", "a pleated skirt"]},
        {"name": "pants", "prompts": ["pants", "trousers", "jeans", "shorts"]},
        {"name": "dress", "prompts": ["a dress", "a gown", "a sundress"]},
        {"name": "belt", "prompts": ["a belt", "a waist belt", "a leather belt"]},
        {"name": "left_shoe", "prompts": ["the person's left shoe", "a shoe on the left foot", "the left sneaker"]},
        {"name": "right_shoe", "prompts": ["the person's right shoe", "a shoe on the right foot",
                                           "the right sneaker"]},
        {"name": "face", "prompts": ["a face", "a person's face", "a human face"]},
        {"name": "left_leg", "prompts": ["the person's left leg", "a bare left leg", "the left leg"]},
        {"name": "right_leg", "prompts": ["the person's right leg", "a bare right leg", "the right leg"]},
        {"name": "left_arm", "prompts": ["the person's left arm", "a bare left arm", "the left arm and hand"]},
        {"name": "right_arm", "prompts": ["the person's right arm", "a bare right arm", "the right arm and hand"]},
        {"name": "bag", "prompts": ["a bag", "a handbag", "a backpack", "a purse"]},
        {"name": "scarf", "prompts": ["a scarf", "a neck scarf", "a shawl"]},
    ],
}


class PresetError(ClipmaskError):
    status = 422


class UnknownPreset(PresetError):
    code = "unknown_preset"

    def __init__(self, preset_id: str) -> None:
        super().__init__(f"No preset {preset_id!r}: use a built-in ({', '.join(BUILTIN)}) or one of yours.")


class PresetExists(PresetError):
    code = "preset_exists"
    status = 409

    def __init__(self, preset_id: str) -> None:
        super().__init__(f"A preset {preset_id!r} already exists (built-in, or yours); choose another id.")


class PresetReadOnly(PresetError):
    code = "preset_read_only"
    status = 409

    def __init__(self, preset_id: str) -> None:
        super().__init__(f"{preset_id!r} is a built-in preset; built-ins can't be changed or deleted.")


class PresetLimitReached(PresetError):
    code = "preset_limit_reached"
    status = 409

    def __init__(self, cap: int) -> None:
        super().__init__(f"You have {cap} presets, the most a tenant may have; delete one first.")


class TooManyLabels(PresetError):
    code = "too_many_labels"

    def __init__(self, count: int) -> None:
        super().__init__(f"The job has {count} labels (preset labels and prompts together); at most {MAX_LABELS}.")


@dataclass(frozen=True)
class PresetDef:
    id: str
    labels: list[dict[str, Any]]  # [{"name", "prompts"}]
    builtin: bool

    def as_object(self) -> dict[str, Any]:
        labels = [{"name": label["name"], "prompts": list(label["prompts"]),
                   **({"threshold": label["threshold"]} if label.get("threshold") is not None else {})}
                  for label in self.labels]
        return {"id": self.id, "object": "preset", "builtin": self.builtin, "labels": labels}


def find(session: Session, tenant_id: str, preset_id: str) -> PresetDef | None:
    if preset_id in BUILTIN:
        return PresetDef(preset_id, BUILTIN[preset_id], True)
    row = session.get(Preset, (tenant_id, preset_id))
    return None if row is None else PresetDef(row.id, list(row.labels), False)


def list_page(session: Session, tenant_id: str, *, after: tuple[bool, str] | None,
              limit: int) -> tuple[list[PresetDef], bool]:
    """Built-ins first, then the tenant's own, each by id: up to `limit` after the (builtin, id)
    position `after`, and whether more follow."""
    found = [PresetDef(name, BUILTIN[name], True) for name in sorted(BUILTIN)
             if after is None or (after[0] and name > after[1])]
    query = select(Preset).where(Preset.tenant_id == tenant_id).order_by(Preset.id).limit(limit + 1)
    if after is not None and not after[0]:
        query = query.where(Preset.id > after[1])
    found += [PresetDef(row.id, list(row.labels), False) for row in session.execute(query).scalars()]
    return found[:limit], len(found) > limit


def create(session: Session, tenant_id: str, preset_id: str, labels: list[dict[str, Any]], *,
           cap: int, remember: Callable[[Session, dict[str, Any]], None] | None = None) -> PresetDef:
    """Insert and commit a tenant's preset; PresetExists for a built-in id or one the tenant has,
    PresetLimitReached when it has `cap` already (counted under a per-tenant lock, so two creates
    at once can't both pass). `remember` keeps the answer (an Idempotency-Key's) in the same commit."""
    if preset_id in BUILTIN:
        raise PresetExists(preset_id)
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext("clipmask.presets:" + tenant_id))))
    count = session.execute(select(func.count()).select_from(Preset).where(Preset.tenant_id == tenant_id)).scalar_one()
    if count >= cap:
        session.rollback()
        raise PresetLimitReached(cap)
    session.add(Preset(tenant_id=tenant_id, id=preset_id, labels=labels, created_at=utcnow()))
    created = PresetDef(preset_id, labels, False)
    if remember is not None:
        remember(session, created.as_object())
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise PresetExists(preset_id) from exc
    return created


def delete(session: Session, tenant_id: str, preset_id: str) -> bool:
    """Delete a tenant's preset (True), or False if it has none by that id; built-ins: PresetReadOnly."""
    if preset_id in BUILTIN:
        raise PresetReadOnly(preset_id)
    row = session.get(Preset, (tenant_id, preset_id))
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def expand(preset: PresetDef | None, prompts: list[str], image_prompts: list[dict[str, Any]] | None = None,
           box_prompts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The job's labels, in result order: the preset's, then the text prompts, then the image
    prompts, then the box prompts (TooManyLabels past 32). An image label names its example:
    {"image_url"} or {"key"}; a box label carries its boxes and negative boxes."""
    labels = [{"name": label["name"], "prompts": list(label["prompts"]), "source": "preset",
               **({"threshold": label["threshold"]} if label.get("threshold") is not None else {})}
              for label in (preset.labels if preset else [])]
    labels += [{"name": prompt, "prompts": [prompt], "source": "text"} for prompt in prompts]
    for example in image_prompts or []:
        source = {"image_url": example["image_url"]} if "image_url" in example else {"key": example["key"]}
        labels.append({"name": example["label"], "prompts": [], "source": "image", "example": source})
    for box in box_prompts or []:
        labels.append({"name": box["label"], "prompts": [], "source": "box", "boxes": box["boxes"],
                       "negative_boxes": box.get("negative_boxes", [])})
    if len(labels) > MAX_LABELS:
        raise TooManyLabels(len(labels))
    return labels


def labels_of(job_labels: list[dict[str, Any]] | None, prompts: list[str]) -> list[dict[str, Any]]:
    """A job's labels; jobs created before presets existed have only their prompts."""
    if job_labels:
        return job_labels
    return [{"name": prompt, "prompts": [prompt], "source": "text"} for prompt in prompts]
