"""Presets: a tenant's named label sets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import PROMPT_ITEMS
from api.schemas.jobs import JobParams
from shared.presets import MAX_LABEL_NAME, MAX_PHRASINGS, MAX_PRESET_LABELS, PRESET_ID


class PresetLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_LABEL_NAME, description="The label's name in results.")
    prompts: list[str] = Field(min_length=1, max_length=MAX_PHRASINGS, json_schema_extra=PROMPT_ITEMS,
                               description=f"1 to {MAX_PHRASINGS} phrasings; their text embeddings are averaged.")
    threshold: float | None = Field(default=None, gt=0, lt=1, description=(
        "This label's own threshold (for example `clipmask eval --calibrate`'s), used by jobs that give no "
        "`threshold` of their own; absent: 0.4."))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the label name is blank")
        return value

    @field_validator("prompts")
    @classmethod
    def _phrasings(cls, value: list[str]) -> list[str]:
        return JobParams._prompts(value)


class PresetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Your id for it (letters, digits, _ . -); not a built-in's.",
                    json_schema_extra={"pattern": PRESET_ID.pattern, "maxLength": 64})
    labels: list[PresetLabel] = Field(min_length=1, max_length=MAX_PRESET_LABELS)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not PRESET_ID.match(value):
            raise ValueError("a preset id is 1 to 64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("labels")
    @classmethod
    def _unique_names(cls, value: list[PresetLabel]) -> list[PresetLabel]:
        names = [label.name for label in value]
        if len(set(names)) != len(names):
            raise ValueError("label names must be unique within a preset")
        return value


class PresetObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["preset"]
    builtin: bool
    labels: list[PresetLabel]


class PresetList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[PresetObject]
    next_cursor: str | None


PRESET_FIELD_CODES = {"id": "invalid_preset_id", "labels": "invalid_labels"}
