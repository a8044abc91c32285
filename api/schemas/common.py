"""What every resource's schemas share: the output and refine kinds, the limits, URL and metadata rules,
the 422 built from pydantic's errors, problem+json, paging and the create headers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic.config import JsonDict

from api.problems import ApiProblem
from shared.fetch import check_url_syntax

OutputKind = Literal["mask", "soft", "rle", "cutout", "label_map", "overlay", "instances"]


OUTPUT_KINDS: tuple[str, ...] = ("mask", "soft", "rle", "cutout", "label_map", "overlay", "instances")


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
MAX_BOX_PROMPTS = 4  # SAM 3's exemplar prompts per job
MAX_BOXES = 8  # positive boxes per box prompt, and negative ones


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
    "box_prompts": "invalid_box_prompts",
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


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, str]] | None = None


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


class PageQuery(BaseModel):
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")
