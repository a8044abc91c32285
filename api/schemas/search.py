"""Similarity search over stored CLIP embeddings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import HTTP_URL, MAX_METADATA_CHARS, MAX_METADATA_PAIRS, METADATA, check_http_url

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
