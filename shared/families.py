"""What a job on each model family may ask for (GET /v1/models' `capabilities`), and the job fields
that need each capability: a field its base's family lacks is 422 unsupported_for_model."""

from __future__ import annotations

CAPABILITIES: dict[str, list[str]] = {
    "clipseg": ["image_prompts", "embed", "instances", "finetune"],
    "sam3": ["box_prompts", "instances", "presence"],
}
FAMILIES = tuple(CAPABILITIES)
# job field -> the capability it needs
FIELD_CAPABILITY = {"image_prompts": "image_prompts", "box_prompts": "box_prompts", "embed": "embed"}


def unsupported_fields(family: str, fields: dict[str, bool]) -> list[str]:
    """The job fields set (fields[name] true) that `family` cannot serve."""
    can = set(CAPABILITIES.get(family, []))
    return [name for name, given in fields.items() if given and FIELD_CAPABILITY[name] not in can]
