"""The product's vocabulary: statuses and event types, one StrEnum each.

They are `str` subclasses, so they compare equal to the strings stored in Postgres and go into
JSON as plain strings; code says `JobStatus.QUEUED`, never a bare "queued".
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB


FINISHED_JOB = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
UNFINISHED_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)


class BatchStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELED = "canceled"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobEvent(StrEnum):
    """Events a job sends to its webhook (the default set is every final one; job.started is opt-in)."""

    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"
    STARTED = "job.started"

    @classmethod
    def for_status(cls, status: str) -> JobEvent | None:
        """The event a job that just reached `status` sends; None for a status that sends none."""
        return _JOB_EVENT_BY_STATUS.get(status)


_JOB_EVENT_BY_STATUS: dict[str, JobEvent] = {
    JobStatus.SUCCEEDED: JobEvent.SUCCEEDED, JobStatus.FAILED: JobEvent.FAILED, JobStatus.CANCELED: JobEvent.CANCELED,
}


class BatchEvent(StrEnum):
    COMPLETED = "batch.completed"


EventType = JobEvent | BatchEvent
