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
