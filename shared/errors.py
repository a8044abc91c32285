"""Domain errors. Each carries a stable snake_case `code` that clients can switch on."""

from __future__ import annotations


class ClipmaskError(Exception):
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class JobFailure(ClipmaskError):
    """A job cannot succeed; the worker records it as `failed` with this code (no retry)."""


class ImageFetchFailed(JobFailure):
    code = "image_fetch_failed"


class ImageTooLarge(JobFailure):
    code = "image_too_large"


class ImageInvalid(JobFailure):
    code = "image_invalid"


class StorageFailed(JobFailure):
    code = "storage_failed"


class SubmissionRefused(ClipmaskError):
    """A create request that can't be accepted now; the API maps each kind to its problem."""


class QueueFull(SubmissionRefused):
    code = "too_many_queued_jobs"

    def __init__(self, *, queued: int, cap: int, adding: int) -> None:
        super().__init__(f"{queued} jobs are waiting and the limit is {cap}; {adding} more would pass it. "
                         "Retry when some have run.")
        self.queued, self.cap, self.adding = queued, cap, adding


class IdempotencyKeyReused(SubmissionRefused):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different request; use a new key.")


class QueueUnavailable(SubmissionRefused):
    code = "dependency_unavailable"

    def __init__(self) -> None:
        super().__init__("The queue (Redis) is not answering; try again shortly.")
