"""The one time helper: aware UTC datetimes and the contract's ISO 8601 form with a `Z`."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def isoformat(value: dt.datetime | None) -> str | None:
    """`2026-11-21T09:30:00.123Z`, or None for None."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
