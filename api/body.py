"""Read what the client sent before answering, so every client can read the answer.

When the API answers before it read the body (413 for a body over the limit, 401 for a bad key,
415, ...), the WSGI server closes the connection with the rest of the body unread. curl notices
the early answer; Python's urllib, requests and httpx keep writing the body, get a broken pipe,
and never see the 413. So after the app has answered, this middleware reads and discards the
unread rest of the body, up to `limit` bytes (a body larger still is cut off as before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

CHUNK = 1 << 20


class _CountingInput:
    """wsgi.input that counts what the app read."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.consumed = 0

    def read(self, *args: Any) -> bytes:
        data: bytes = self.stream.read(*args)
        self.consumed += len(data)
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self.stream.readline(*args)
        self.consumed += len(data)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self.stream.readlines(*args)
        self.consumed += sum(len(line) for line in lines)
        return lines

    def __iter__(self) -> Any:
        for line in self.stream:
            self.consumed += len(line)
            yield line


class DrainUnreadBody:
    def __init__(self, app: Callable[..., Iterable[bytes]], *, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        counted = _CountingInput(environ["wsgi.input"])
        environ["wsgi.input"] = counted
        result = self.app(environ, start_response)
        self._drain(environ, counted)
        return result

    def _drain(self, environ: dict[str, Any], counted: _CountingInput) -> None:
        length = environ.get("CONTENT_LENGTH") or ""
        if length.isascii() and length.isdigit() and len(length) < 19:
            remaining = int(length) - counted.consumed
        elif environ.get("wsgi.input_terminated"):
            remaining = self.limit + 1  # chunked: read to its end, within the limit
        else:
            return  # unknown length on a stream that would block past the body
        if remaining <= 0 or remaining > self.limit:
            return
        try:
            while remaining > 0:
                data = counted.stream.read(min(CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
        except OSError:
            pass  # the client went away: nothing to answer
