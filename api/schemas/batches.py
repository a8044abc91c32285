"""A batch: its create bodies, items, counts, the batch object and batch.completed's payload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import (
    HTTP_URL,
    MAX_BOX_PROMPTS,
    MAX_IMAGE_PROMPTS,
    MAX_PROMPTS,
    METADATA,
    PROMPT_ITEMS,
    REFINE_DESCRIPTION,
    EmbedKind,
    OutputKind,
    PageQuery,
    RefineMethod,
    default_outputs,
)
from api.schemas.jobs import BoxPromptIn, ImagePrompt
from shared.enums import BatchEvent, BatchStatus, JobEvent

BatchPriority = Literal["low", "normal", "high"]
PRIORITY_DESCRIPTION = ("The order of this tenant's batches in the bulk lane: high before normal before low, "
                        "then oldest first. Within a tenant only: other tenants' share of the workers (by "
                        "weight) is unchanged.")


class BatchItem(BaseModel):
    """One catalog item; fields it leaves out come from the batch."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(default=None, description="http(s) URL the worker downloads (or image_s3_uri).",
                                  json_schema_extra=HTTP_URL)
    image_s3_uri: str | None = Field(default=None, description="s3://bucket/key from an allowed bucket.")
    prompts: list[str] | None = Field(default=None, description="Default: the batch's prompts.",
                                      json_schema_extra=PROMPT_ITEMS)
    threshold: float | None = Field(default=None, description="Default: the batch's threshold.")
    metadata: dict[str, str] | None = Field(default=None, description="Merged over the batch's metadata.")
    preset: str | None = Field(default=None, description="Default: the batch's preset.")
    outputs: list[OutputKind] | None = Field(default=None, description="Default: the batch's outputs.")
    image_prompts: list[ImagePrompt] | None = Field(default=None, description="Default: the batch's image prompts.")
    box_prompts: list[BoxPromptIn] | None = Field(default=None, description="Default: the batch's box prompts.")
    embed: list[EmbedKind] | None = Field(default=None, description="Default: the batch's embed.")
    model: str | None = Field(default=None, description="Default: the batch's model.")
    refine: RefineMethod | None = Field(default=None, description="Default: the batch's refine.")


class BatchCreate(BaseModel):
    """`POST /v1/batches` as JSON. As multipart, the file part `items` holds JSONL or CSV and the other
    fields are form fields (`prompts` repeated, `metadata` a JSON string)."""

    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] | None = Field(default=None, description="1 to 100,000 items (or the file part).",
                                          json_schema_extra={"minItems": 1, "maxItems": 100_000})
    prompts: list[str] | None = Field(default=None, description="Prompts for items that set none.",
                                      json_schema_extra={**PROMPT_ITEMS, "maxItems": MAX_PROMPTS})
    threshold: float = Field(default=0.4, gt=0, lt=1)
    preset: str | None = Field(default=None, description="Preset for items that set none.")
    outputs: list[OutputKind] = Field(default_factory=default_outputs, min_length=1,
                                      description="Outputs for items that set none.")
    image_prompts: list[ImagePrompt] | None = Field(default=None, description="Image prompts for items that set none.",
                                                    json_schema_extra={"maxItems": MAX_IMAGE_PROMPTS})
    box_prompts: list[BoxPromptIn] | None = Field(default=None, description="Box prompts for items that set none.",
                                                  json_schema_extra={"maxItems": MAX_BOX_PROMPTS})
    embed: list[EmbedKind] | None = Field(default=None, description="Embeddings for items that set none.")
    model: str | None = Field(default=None, description="Model for items that set none (GET /v1/models).")
    refine: RefineMethod = Field(default="none",
                                 description="Refinement for items that set none: " + REFINE_DESCRIPTION)
    webhook_url: str | None = Field(default=None, description="Receives the items' job events and batch.completed.",
                                    json_schema_extra=HTTP_URL)
    webhook_events: list[JobEvent | BatchEvent] | None = Field(
        default=None, description="Subset of events to deliver; default all four.")
    metadata: dict[str, str] = Field(default_factory=dict, description="The batch's own, and items' defaults.",
                                     json_schema_extra=METADATA)
    priority: BatchPriority = Field(default="normal", description=PRIORITY_DESCRIPTION)


class BatchCreateMultipart(BaseModel):
    items: bytes = Field(description="JSONL (item objects) or CSV (header with image_url; optional preset, refine, and "
                                     "prompts and outputs separated by |; other columns to metadata).",
                         json_schema_extra={"format": "binary"})
    prompts: list[str] | None = None
    preset: str | None = None
    outputs: list[OutputKind] | None = Field(default=None, description="Repeat the field once per output.")
    image_prompts: str | None = Field(default=None, description="A JSON list of image prompts, as a string.",
                                      json_schema_extra={"contentMediaType": "application/json"})
    embed: list[EmbedKind] | None = Field(default=None, description="Repeat the field once per kind.")
    threshold: float | None = None
    model: str | None = None
    refine: RefineMethod | None = None
    webhook_url: str | None = None
    webhook_events: list[JobEvent | BatchEvent] | None = None
    metadata: str | None = Field(default=None, description="A JSON object of strings, as a string.",
                                 json_schema_extra={"contentMediaType": "application/json"})
    priority: BatchPriority = "normal"


class BatchCounts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class BatchObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["batch"]
    status: BatchStatus
    counts: BatchCounts
    created_at: str
    finished_at: str | None
    results_url: str | None = Field(description="Presigned URL of a JSONL file, one job object per line.")
    metadata: dict[str, str]
    webhook_url: str | None
    priority: BatchPriority = Field(description=PRIORITY_DESCRIPTION)


class BatchEventPayload(BaseModel):
    """The body POSTed when a batch completes."""

    type: Literal[BatchEvent.COMPLETED]
    timestamp: str
    data: BatchObject


class BatchJobsQuery(PageQuery):
    status: str | None = Field(default=None, description="One job status or several separated by commas.")
