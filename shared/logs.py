"""Logging setup: one line per event, with job_id / tenant_id / batch_id when the caller gives them."""

from __future__ import annotations

import json
import logging
import sys

CONTEXT_FIELDS = ("job_id", "batch_id", "tenant_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in (*CONTEXT_FIELDS, "error", "stage", "duration_ms", "code"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the context fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{name}={getattr(record, name)}" for name in (*CONTEXT_FIELDS, "code", "duration_ms")
                  if getattr(record, name, None) is not None]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(level: str, fmt: str = "json") -> None:
    """Root logger to stderr: JSON lines (default) or text, UTC timestamps."""
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
