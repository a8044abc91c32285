"""Models: the deployment's bases and a tenant's fine-tuned models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class BaseInfo(BaseModel):
    id: str
    revision: str | None


class ModelLabel(BaseModel):
    name: str
    prompts: list[str]
    threshold: float | None = None


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["model"]
    builtin: bool = Field(description="The deployment's base model (read-only), or one of your fine-tuned ones.")
    base: BaseInfo | None = Field(description="For a fine-tuned model: the backbone it runs on.")
    revision: str | None = Field(description="sha256 of the weights (a fine-tuned model), or the base's revision.")
    labels: list[ModelLabel] = Field(description="Its own labels, with calibrated thresholds; [] for a base model.")
    metrics: dict[str, Any] = Field(description="Validation metrics from clipmask finetune (before and after).")
    created_at: str
    family: Literal["clipseg"] | None = Field(default=None, description="A base model's family; absent for yours.")
    capabilities: list[str] | None = Field(
        default=None, description="What a job on this base may ask for beyond prompts (a base only).")
    served: bool | None = Field(
        default=None, description="A base only: whether a live worker serves it now. A base no worker has served "
                                  "for CLIPMASK_SERVED_BASE_TTL_S (a day) is no longer listed or accepted.")


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[ModelObject]


class ModelCreateMultipart(BaseModel):
    """`POST /v1/models` as multipart/form-data: the folder `clipmask finetune` wrote."""

    id: str = Field(description="Your id for it: 1 to 64 of a-z, 0-9, '.', '_', '-'.",
                    json_schema_extra={"pattern": r"^[a-z0-9._-]{1,64}$"})
    manifest: bytes = Field(description="The folder's clipmask-model.json.", json_schema_extra={"format": "binary"})
    weights: bytes = Field(description="The folder's decoder.safetensors.", json_schema_extra={"format": "binary"})
