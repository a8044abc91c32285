"""Request and response schemas. The OpenAPI document is generated from these same models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.config import JsonDict

from api.problems import ApiProblem
from shared.enums import BatchEvent, BatchStatus, DeliveryStatus, JobEvent, JobStatus
from shared.fetch import check_url_syntax
from shared.presets import MAX_LABEL_NAME, MAX_PHRASINGS, MAX_PRESET_LABELS, PRESET_ID
from shared.s3uri import parse_s3_uri

OutputKind = Literal["mask", "soft", "rle", "cutout", "label_map", "overlay"]
OUTPUT_KINDS: tuple[str, ...] = ("mask", "soft", "rle", "cutout", "label_map", "overlay")
RefineMethod = Literal["none", "guided", "matting"]
REFINE_DESCRIPTION = (
    "How each label's prediction is brought to the image's size: none (bilinear upsampling), guided (edge-aware "
    "upsampling with the image as guide; every output follows it), matting (guided, then soft maps and cutouts "
    "from an alpha matte around the outline; labels past the deployment's matting bound stay guided, and their "
    "result says refine: guided).")


def default_outputs() -> list[OutputKind]:
    return ["mask"]


EmbedKind = Literal["image", "masks"]
EMBED_KINDS: tuple[str, ...] = ("image", "masks")
MAX_IMAGE_PROMPTS = 4

MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 200
MAX_METADATA_PAIRS = 16
MAX_METADATA_CHARS = 500

# The stable error code for a bad value in each field (first bad field wins).
FIELD_CODES = {
    "prompts": "invalid_prompts",
    "threshold": "invalid_threshold",
    "webhook_url": "invalid_webhook_url",
    "webhook_events": "invalid_webhook_events",
    "metadata": "invalid_metadata",
    "image_url": "invalid_image_url",
    "image_base64": "invalid_image_base64",
    "image_s3_uri": "invalid_image_s3_uri",
    "preset": "unknown_preset",
    "outputs": "invalid_outputs",
    "image_prompts": "invalid_image_prompts",
    "embed": "invalid_embed",
    "model": "unknown_model",
    "refine": "invalid_refine",
}


# What the validators below enforce, said in the JSON schema too (documentation and generators).
PROMPT_ITEMS: JsonDict = {"items": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": r"\S"}}
HTTP_URL: JsonDict = {"format": "uri", "pattern": r"^https?://[^\s/?#]+", "maxLength": 4096}
METADATA: JsonDict = {"maxProperties": MAX_METADATA_PAIRS, "propertyNames": {"maxLength": MAX_METADATA_CHARS},
            "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_CHARS}}


def check_http_url(value: str) -> str:
    value = value.strip()
    if len(value) > 4096:
        raise ValueError("the URL is longer than 4096 characters")
    problem = check_url_syntax(value)
    if problem:
        raise ValueError(problem)
    return value


def _known_kinds(value: Any, known: tuple[str, ...], what: str) -> Any:
    """A list field of named kinds: unknown names refused by name, repeats dropped."""
    if isinstance(value, list):
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r}; any of {', '.join(known)}")
        return list(dict.fromkeys(value))
    return value


class ImagePrompt(BaseModel):
    """An example image whose look is segmented (CLIPSeg's visual prompt): exactly one of image_url
    and image_base64, fetched and decoded under the same rules as the job's image."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="The result's `prompt`.", json_schema_extra={"minLength": 1, "pattern": r"\S",
                                                                               "maxLength": MAX_PROMPT_CHARS})
    image_url: str | None = Field(default=None, json_schema_extra=HTTP_URL)
    image_base64: str | None = Field(default=None, json_schema_extra={"contentEncoding": "base64"})

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        text = value.strip()
        if not text or len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"a label is 1 to {MAX_PROMPT_CHARS} characters")
        return text

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
        description="What to return per label (mask, soft, rle, cutout) and per image (label_map, overlay).")
    image_prompts: list[ImagePrompt] = Field(
        default_factory=list, max_length=MAX_IMAGE_PROMPTS,
        description=f"Up to {MAX_IMAGE_PROMPTS} example images: segment what looks like each (results after the "
                    "text prompts').")
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
    embed: list[EmbedKind] | None = Field(default=None, description="Repeat the field once per kind.")
    threshold: float = Field(default=0.4, gt=0, lt=1)
    model: str | None = None
    refine: RefineMethod = "none"
    webhook_url: str | None = None
    webhook_events: list[JobEvent] | None = Field(default=None, description="Repeat the field once per event.")
    metadata: str | None = Field(default=None, description='A JSON object of strings, as a string: {"sku": "123"}.',
                                 json_schema_extra={"contentMediaType": "application/json"})


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_problem(exc: ValidationError, codes: dict[str, str] | None = None) -> ApiProblem:
    """Turn pydantic's errors into a 422 whose `code` names the first bad field."""
    errors = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        errors.append({"field": _field_path(loc), "message": message})
    first = exc.errors()[0]
    top = str(first["loc"][0]) if first["loc"] else ""
    top_level_extra = first["type"] == "extra_forbidden" and len(first["loc"]) == 1
    code = "unknown_field" if top_level_extra else (codes or FIELD_CODES).get(top, "invalid_request")
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return ApiProblem(422, code, f"The request has invalid fields: {detail}", errors=errors)


# ---- response objects (documentation and the contract test use them) -------------------

class ImageSize(BaseModel):
    width: int
    height: int


class CocoRle(BaseModel):
    size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(description="[height, width]")
    counts: str = Field(description="pycocotools' compressed counts string.")


class MaskResult(BaseModel):
    """One label's result; fields by `outputs` (those not asked for are absent)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="The preset label's name or the text prompt.")
    source: Literal["preset", "text", "image", "model"]
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
    score: float = Field(description="Highest probability anywhere in the image for this label.")
    refine: RefineMethod | None = Field(default=None, description="How this label's outputs were refined: the "
                                        "job's refine, except guided where matting fell back (over the bound, or "
                                        "no outline to matte). Absent on jobs from before refine existed.")
    embedding: list[float] | None = Field(default=None, description="(embed: masks) L2-normalised CLIP image "
                                          "embedding of the label's masked crop; null for an empty mask.")


class JobOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label_map_url: str | None = Field(default=None, description="(label_map) Palette PNG: 0 none, else 1 + the "
                                      "index of the most probable result reaching the threshold.")
    overlay_url: str | None = Field(default=None, description="(overlay) JPEG of the image with the labels tinted.")


class BaseInfo(BaseModel):
    id: str
    revision: str | None


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
    embed: list[str]
    embedding: list[float] | None
    embedding_model: str | None


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[JobObject]
    next_cursor: str | None


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, str]] | None = None


# ---- batches ------------------------------------------------------------------------------

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


# ---- webhook deliveries -------------------------------------------------------------------

class WebhookDeliveryObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The webhook-id header; stable across retries.")
    object: Literal["webhook_delivery"]
    event_type: JobEvent | BatchEvent
    job_id: str | None
    batch_id: str | None
    url: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    created_at: str
    delivered_at: str | None


class WebhookDeliveryList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[WebhookDeliveryObject]
    next_cursor: str | None


# ---- webhook payloads (OpenAPI `webhooks`) ----------------------------------------------

class JobEventPayload(BaseModel):
    """The body POSTed for a job event, signed per Standard Webhooks (webhook-id, -timestamp, -signature)."""

    type: JobEvent
    timestamp: str
    data: JobObject


class BatchEventPayload(BaseModel):
    """The body POSTed when a batch completes."""

    type: Literal[BatchEvent.COMPLETED]
    timestamp: str
    data: BatchObject


# ---- query strings and headers ------------------------------------------------------------

class IdempotencyHeader(BaseModel):
    idempotency_key: str | None = Field(
        default=None, alias="Idempotency-Key", min_length=1, max_length=255,
        description="The same key and body within 24 h replays the first response (with Idempotent-Replayed: "
                    "true): a create that waited and answered 201 replays as 201 with the final job. The same key "
                    "with another body is 409 idempotency_key_reused.")


class PreferHeader(BaseModel):
    prefer: str | None = Field(
        default=None, alias="Prefer",
        description="`wait` or `wait=N` (1 to 60 seconds; larger counts as 60): hold the answer until the job is "
                    "final or N seconds pass. A malformed preference is ignored (RFC 7240). Waiters are capped per "
                    "API process and per tenant: past a cap the answer comes at once, as without Prefer (no "
                    "Preference-Applied), never refused.")


class CreateJobHeaders(IdempotencyHeader, PreferHeader):
    pass


class PageQuery(BaseModel):
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


class JobListQuery(PageQuery):
    status: str | None = Field(default=None, description="One job status or several separated by commas.")
    batch_id: str | None = None


class BatchJobsQuery(PageQuery):
    status: str | None = Field(default=None, description="One job status or several separated by commas.")


class DeliveryListQuery(PageQuery):
    job_id: str | None = None
    batch_id: str | None = None
    status: str | None = Field(default=None, description="pending, succeeded or failed; several separated by commas.")


# ---- presets ------------------------------------------------------------------------------

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


class PresetList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[PresetObject]
    next_cursor: str | None


PRESET_FIELD_CODES = {"id": "invalid_preset_id", "labels": "invalid_labels"}


# ---- similarity search -------------------------------------------------------------------------

SEARCH_FIELD_CODES = {
    "text": "invalid_search_query", "image_url": "invalid_image_url", "image_base64": "invalid_image_base64",
    "job_id": "invalid_job_id", "result_index": "invalid_result_index", "scope": "invalid_scope",
    "limit": "invalid_limit", "batch_id": "invalid_batch_id", "metadata": "invalid_metadata",
}
MAX_SEARCH_TEXT_CHARS = 1000


class SearchRequest(BaseModel):
    """`POST /v1/search`: exactly one query - text, an image (image_url or image_base64), or a stored
    job (and result) - else 422 invalid_search_query."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="Embedded by a worker with the checkpoint's CLIP text model "
                             "(past 77 tokens truncated, as CLIP does).",
                             json_schema_extra={"minLength": 1, "maxLength": MAX_SEARCH_TEXT_CHARS, "pattern": r"\S"})
    image_url: str | None = Field(default=None, json_schema_extra=HTTP_URL)
    image_base64: str | None = Field(default=None, json_schema_extra={"contentEncoding": "base64"})
    job_id: str | None = Field(default=None, description="A job of yours run with `embed`: its stored embedding "
                               "is the query (no model needed).", json_schema_extra={"maxLength": 64})
    result_index: int | None = Field(default=None, ge=0, lt=32,
                                     description="With job_id: that result's embedding; null: the image's.")
    scope: Literal["images", "masks"] = Field(default="images", description="Search whole images or label crops.")
    limit: int = Field(default=10, ge=1, le=100)
    batch_id: str | None = Field(default=None, json_schema_extra={"maxLength": 64})
    metadata: dict[str, str] | None = Field(default=None, json_schema_extra=METADATA,
                                            description="Exact match on every given pair.")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.strip()
            if not value or len(value) > MAX_SEARCH_TEXT_CHARS:
                raise ValueError(f"text is 1 to {MAX_SEARCH_TEXT_CHARS} characters")
        return value

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > MAX_METADATA_PAIRS or any(
                len(k) > MAX_METADATA_CHARS or len(v) > MAX_METADATA_CHARS for k, v in value.items())):
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs of at most {MAX_METADATA_CHARS} characters")
        return value


class SearchHit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    result_index: int | None = Field(description="The result whose crop matched; null for a whole image.")
    prompt: str | None = Field(description="That result's label; null for a whole image.")
    score: float = Field(description="Cosine similarity, -1 to 1.")
    metadata: dict[str, str]
    mask_url: str | None = Field(description="The result's mask (when the job stored masks); null for images.")


class SearchList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[SearchHit]
