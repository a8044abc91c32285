"""Webhook deliveries: the delivery object, its list and query."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import PageQuery
from shared.enums import BatchEvent, DeliveryStatus, JobEvent


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


class DeliveryListQuery(PageQuery):
    job_id: str | None = None
    batch_id: str | None = None
    status: str | None = Field(default=None, description="pending, succeeded or failed; several separated by commas.")
