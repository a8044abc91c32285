"""A job: its create bodies (JSON and multipart), the job object and its parts, its list and its event."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.schemas.common import (
    EMBED_KINDS,
    HTTP_URL,
    MAX_BOX_PROMPTS,
    MAX_BOXES,
    MAX_IMAGE_PROMPTS,
    MAX_METADATA_CHARS,
    MAX_METADATA_PAIRS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    METADATA,
    OUTPUT_KINDS,
    PROMPT_ITEMS,
    REFINE_DESCRIPTION,
    EmbedKind,
    IdempotencyHeader,
    OutputKind,
    PageQuery,
    PreferHeader,
    RefineMethod,
    _known_kinds,
    check_http_url,
    default_outputs,
)
from api.schemas.models import BaseInfo
from shared.enums import JobEvent, JobStatus
from shared.presets import PRESET_ID
from shared.s3uri import parse_s3_uri


def label_text(value: str) -> str:
    """An image or box prompt's label: the result's `prompt`, trimmed, 1 to MAX_PROMPT_CHARS characters."""
    text = value.strip()
    if not text or len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"a label is 1 to {MAX_PROMPT_CHARS} characters")
    return text


Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in the image's pixels")]


class BoxPromptIn(BaseModel):
    """Exemplar boxes (SAM 3): segment every instance like the boxed examples, unlike the negative ones."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="The result's `prompt`.", json_schema_extra={"minLength": 1, "pattern": r"\S",
                                                                               "maxLength": MAX_PROMPT_CHARS})
    boxes: list[Box] = Field(min_length=1, max_length=MAX_BOXES)
    negative_boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES)

    _label = field_validator("label")(classmethod(lambda cls, value: label_text(value)))

    @field_validator("boxes", "negative_boxes")
    @classmethod
    def _boxes(cls, value: list[list[float]]) -> list[list[float]]:
        for x0, y0, x1, y1 in value:
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise ValueError("box coordinates are finite numbers")
            if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError("a box is [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1, in pixels")
        return value


class ImagePrompt(BaseModel):
    """An example image whose look is segmented (CLIPSeg's visual prompt): exactly one of image_url
    and image_base64, fetched and decoded under the same rules as the job's image."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="The result's `prompt`.", json_schema_extra={"minLength": 1, "pattern": r"\S",
                                                                               "maxLength": MAX_PROMPT_CHARS})
    image_url: str | None = Field(default=None, json_schema_extra=HTTP_URL)
    image_base64: str | None = Field(default=None, json_schema_extra={"contentEncoding": "base64"})

    _label = field_validator("label")(classmethod(lambda cls, value: label_text(value)))

    @field_validator("image_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @model_validator(mode="after")
    def _one_source(self) -> ImagePrompt:
        if (self.image_url is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of image_url and image_base64")
        return self


class JobParams(BaseModel):
    """Everything about a job except where the image comes from."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        default_factory=list, max_length=MAX_PROMPTS, json_schema_extra=PROMPT_ITEMS,
        description=f"Up to {MAX_PROMPTS} text prompts, each 1 to {MAX_PROMPT_CHARS} characters after trimming. "
                    "A job needs prompts, a preset, or both. A prompt past CLIP's 77 tokens is truncated there, "
                    "as CLIP's own tokenizer does (the job keeps it as given).",
    )
    preset: str | None = Field(default=None, description="Id of a built-in preset (clothing, human_parsing) or of "
                               "one of yours; its labels come first in the results.",
                               json_schema_extra={"maxLength": 64})
    outputs: list[OutputKind] = Field(
        default_factory=default_outputs, min_length=1,
        description="What to return per label (mask, soft, rle, cutout, instances) and per image (label_map, "
                    "overlay).")
    image_prompts: list[ImagePrompt] = Field(
        default_factory=list, max_length=MAX_IMAGE_PROMPTS,
        description=f"Up to {MAX_IMAGE_PROMPTS} example images: segment what looks like each (results after the "
                    "text prompts').")
    box_prompts: list[BoxPromptIn] = Field(
        default_factory=list, max_length=MAX_BOX_PROMPTS,
        description=f"Up to {MAX_BOX_PROMPTS} exemplar prompts (sam3 bases): segment every instance like the boxed "
                    "examples (results after the image prompts', source `box`). A box outside the image: 422 "
                    "invalid_box_prompts (for an image by URL, the job fails with that code).")
    embed: list[EmbedKind] = Field(
        default_factory=list, description="CLIP image embeddings to compute and store for search: of the whole "
                                          "image (the job's `embedding`), of each label's masked crop (results').")
    threshold: float = Field(
        default=0.4, gt=0, lt=1, description="A pixel is in the mask where sigmoid(logit) >= threshold.",
    )
    model: str | None = Field(default=None, description="The deployment's base model (GET /v1/models) or one of "
                              "your fine-tuned models; without prompts, preset and image_prompts, the model's own "
                              "labels are segmented, each at its calibrated threshold.",
                              json_schema_extra={"minLength": 1, "maxLength": 1000})
    refine: RefineMethod = Field(default="none", description=REFINE_DESCRIPTION)
    webhook_url: str | None = Field(default=None, description="http(s) URL that receives the job's events.",
                                    json_schema_extra=HTTP_URL)
    webhook_events: list[JobEvent] | None = Field(
        default=None, description="Subset of job events to deliver; default all.",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=METADATA,
        description=f"String pairs echoed back, at most {MAX_METADATA_PAIRS}.",
    )

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs_list(cls, value: Any) -> Any:
        return _known_kinds(value, OUTPUT_KINDS, "output")

    @field_validator("embed", mode="before")
    @classmethod
    def _embed_list(cls, value: Any) -> Any:
        return _known_kinds(value, EMBED_KINDS, "embed")

    @field_validator("image_prompts", mode="before")
    @classmethod
    def _image_prompts_list(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_IMAGE_PROMPTS:
            raise ValueError(f"at most {MAX_IMAGE_PROMPTS} image prompts are allowed, got {len(value)}")
        return value

    @field_validator("preset")
    @classmethod
    def _preset_id(cls, value: str | None) -> str | None:
        if value is not None and not PRESET_ID.match(value):
            raise ValueError("a preset id is 1 to 64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_list(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed, got {len(value)}")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        cleaned = []
        for index, prompt in enumerate(value):
            text = prompt.strip()
            if not text:
                raise ValueError(f"prompt {index} is blank")
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt {index} is longer than {MAX_PROMPT_CHARS} characters")
            cleaned.append(text)
        return cleaned

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("webhook_events")
    @classmethod
    def _events(cls, value: list[JobEvent] | None) -> list[JobEvent] | None:
        return None if value is None else [event for event in JobEvent if event in value]

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        return check_metadata(value)


def check_metadata(value: Any) -> Any:
    """A job's metadata rules (at most 16 pairs of strings of at most 500 characters), ValueError else."""
    if isinstance(value, dict):
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs are allowed")
        for key, item in value.items():
            if not isinstance(item, str):
                raise ValueError(f"the value of {key!r} must be a string")
            if len(key) > MAX_METADATA_CHARS or len(item) > MAX_METADATA_CHARS:
                raise ValueError(f"keys and values are at most {MAX_METADATA_CHARS} characters")
    return value


class JobCreateJson(JobParams):
    """`POST /v1/jobs` with a JSON body: exactly one of image_url, image_base64 or image_s3_uri
    (none: 422 missing_image; more: 422 multiple_images)."""

    image_url: str | None = Field(default=None, description="http(s) URL the worker downloads.",
                                  json_schema_extra=HTTP_URL)
    image_base64: str | None = Field(default=None, description="Base64 image bytes or a data: URI.",
                                     json_schema_extra={"contentEncoding": "base64"})
    image_s3_uri: str | None = Field(default=None, description="s3://bucket/key in the deployment's object storage; "
                                     "only buckets an operator allowed for your tenant (none by default); in the "
                                     "deployment's own bucket, only your own uploads (uploads/<tenant id>/...).",
                                     json_schema_extra={"pattern": r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+"})

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("image_s3_uri")
    @classmethod
    def _image_s3_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parse_s3_uri(value.strip())
            return value.strip()
        return value


class JobCreateMultipart(BaseModel):
    """`POST /v1/jobs` as multipart/form-data: the file part `image`; list fields repeat
    (`-F prompts=shirt -F prompts=pants`); `metadata` is a JSON object as a string. (Documentation
    only: the form is parsed into JobParams.)"""

    image: bytes = Field(description="The image file.", json_schema_extra={"format": "binary"})
    prompts: list[str] | None = Field(default=None,
                                      description="Repeat the field once per prompt; rules as in the JSON body.")
    preset: str | None = None
    outputs: list[OutputKind] | None = Field(default=None, description="Repeat the field once per output.")
    image_prompts: str | None = Field(default=None, description="A JSON list of image prompts, as a string.",
                                      json_schema_extra={"contentMediaType": "application/json"})
    box_prompts: str | None = Field(default=None, description="A JSON list of box prompts, as a string.",
                                    json_schema_extra={"contentMediaType": "application/json"})
    embed: list[EmbedKind] | None = Field(default=None, description="Repeat the field once per kind.")
    threshold: float = Field(default=0.4, gt=0, lt=1)
    model: str | None = None
    refine: RefineMethod = "none"
    webhook_url: str | None = None
    webhook_events: list[JobEvent] | None = Field(default=None, description="Repeat the field once per event.")
    metadata: str | None = Field(default=None, description='A JSON object of strings, as a string: {"sku": "123"}.',
                                 json_schema_extra={"contentMediaType": "application/json"})


class ImageSize(BaseModel):
    width: int
    height: int


class CocoRle(BaseModel):
    size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(description="[height, width]")
    counts: str = Field(description="pycocotools' compressed counts string.")


class Instance(BaseModel):
    """One instance of a label: a connected part of its mask (clipseg)."""

    model_config = ConfigDict(extra="forbid")

    bbox: Annotated[list[int], Field(min_length=4, max_length=4)] = Field(
        description="[x0, y0, x1, y1], exclusive end: the tight box of the instance's own mask.")
    score: float = Field(description="0 to 1: its mean probability (clipseg).")
    area_fraction: float
    rle: CocoRle = Field(description="COCO RLE of the instance's own mask, as for the rle output.")


class MaskResult(BaseModel):
    """One label's result; fields by `outputs` (those not asked for are absent)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="The preset label's name or the text prompt.")
    source: Literal["preset", "text", "image", "box", "model"]
    mask_url: str | None = Field(default=None, description="(mask) Presigned GET URL of an 8-bit grayscale PNG, "
                                 "0 or 255, image size.")
    soft_url: str | None = Field(default=None, description="(soft) 8-bit grayscale PNG of round(255 * p).")
    cutout_url: str | None = Field(default=None, description="(cutout) RGBA PNG of the image cropped to bbox, "
                                   "alpha round(255 * p); null for an empty mask.")
    rle: CocoRle | None = Field(default=None, description="(rle) COCO RLE of the binary mask, as "
                                "pycocotools.mask.encode gives it.")
    bbox: Annotated[list[int], Field(min_length=4, max_length=4)] | None = Field(
        description="[x0, y0, x1, y1], exclusive end; null for an empty mask."
    )
    area_fraction: float
    score: float = Field(description="clipseg: highest probability anywhere in the image for this label; sam3: the "
                         "best kept instance's score (0 when none).")
    presence: float | None = Field(default=None, ge=0, le=1, description="(sam3) How sure the model is that the "
                                   "label appears in the image at all: sigmoid of its presence logit.")
    refine: RefineMethod | None = Field(default=None, description="How this label's outputs were refined: the "
                                        "job's refine, except guided where matting fell back (over the bound, or "
                                        "no outline to matte). Absent on jobs from before refine existed.")
    embedding: list[float] | None = Field(default=None, description="(embed: masks) L2-normalised CLIP image "
                                          "embedding of the label's masked crop; null for an empty mask.")
    instances: list[Instance] | None = Field(default=None, description="(instances) The label's instances, best "
                                             "first, at most CLIPMASK_MAX_INSTANCES (100): for clipseg the "
                                             "8-connected components of its mask covering at least "
                                             "CLIPMASK_INSTANCES_MIN_FRACTION (0.1%) of the image, each scored by "
                                             "its mean probability; for sam3 the instances SAM 3 kept (score = "
                                             "sigmoid(logit) x sigmoid(presence) above the threshold).")


class JobOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label_map_url: str | None = Field(default=None, description="(label_map) Palette PNG: 0 none, else 1 + the "
                                      "index of the most probable result reaching the threshold.")
    overlay_url: str | None = Field(default=None, description="(overlay) JPEG of the image with the labels tinted.")


class ModelInfo(BaseModel):
    id: str = Field(description="The checkpoint (a hub id or a local folder), or your fine-tuned model's id.")
    revision: str | None = Field(description="The hub commit, or sha256 of a local folder's or a model's weights.")
    base: BaseInfo | None = Field(default=None, description="For a fine-tuned model: the backbone it ran on.")


class JobError(BaseModel):
    code: str = Field(description="image_fetch_failed, image_too_large, image_invalid, storage_failed, "
                                  "model_not_found, model_output_invalid, attempts_exhausted (taken "
                                  "CLIPMASK_JOB_MAX_ATTEMPTS times without finishing), internal")
    message: str


class JobObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["job"]
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    input: dict[str, Any] = Field(description='{"image_url": ...} or {"upload": {filename, content_type, bytes}}')
    image: ImageSize | None = Field(description="The image's size after EXIF orientation; null until the job is "
                                                "final (it is written with the final state), and on a job whose "
                                                "image was never decoded.")
    prompts: list[str]
    threshold: float
    results: list[MaskResult]
    error: JobError | None
    metadata: dict[str, str]
    batch_id: str | None
    webhook_url: str | None
    attempts: int = Field(description="Times a worker took the job (0 while never taken).")
    preset: str | None
    outputs_requested: list[OutputKind]
    outputs: JobOutputs
    refine: RefineMethod = Field(description="The refinement asked for (each result says what it got).")
    model: ModelInfo | None = Field(description="The checkpoint that ran the job, once running.")
    image_prompts: list[dict[str, Any]]
    box_prompts: list[dict[str, Any]] = Field(description="The box prompts as given: {label, boxes, negative_boxes}.")
    embed: list[str]
    embedding: list[float] | None
    embedding_model: str | None


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[JobObject]
    next_cursor: str | None


class JobEventPayload(BaseModel):
    """The body POSTed for a job event, signed per Standard Webhooks (webhook-id, -timestamp, -signature)."""

    type: JobEvent
    timestamp: str
    data: JobObject


class CreateJobHeaders(IdempotencyHeader, PreferHeader):
    pass


class JobListQuery(PageQuery):
    status: str | None = Field(default=None, description="One job status or several separated by commas.")
    batch_id: str | None = None
