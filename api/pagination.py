"""Keyset paging, newest first, for anything with `created_at` and `id` (jobs, deliveries)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from flask import request
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from api.parsing import text_ok
from api.problems import ApiProblem

MAX_LIMIT = 100
DEFAULT_LIMIT = 20


def opaque_cursor(position: list[Any]) -> str:
    """An opaque cursor holding a list's sort key after its last row."""
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def read_cursor(cursor: str, parse: Callable[[list[Any]], Any]) -> Any:
    """`parse` of the position an opaque cursor holds; 400 invalid_cursor for anything this API did not
    return (parse raises ValueError or TypeError for a position it does not take)."""
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(position, list):
            raise ValueError("not a position")
        return parse(position)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ApiProblem(400, "invalid_cursor", "The cursor is not one this API returned.",
                         errors=[{"field": "cursor", "message": "invalid"}]) from exc


def stored_id(value: Any) -> str:
    if not (isinstance(value, str) and text_ok(value)):
        raise ValueError("not an id")
    return value


def encode_cursor(row: Any) -> str:
    """An opaque cursor after `row`."""
    return opaque_cursor([row.created_at.isoformat(), row.id])


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    def parse(position: list[Any]) -> tuple[dt.datetime, str]:
        created, last_id = position
        return dt.datetime.fromisoformat(created), stored_id(last_id)

    result: tuple[dt.datetime, str] = read_cursor(cursor, parse)
    return result


def parse_limit() -> int:
    """`limit`: ASCII digits only (str.isdigit() also takes '²', which int() refuses), 1 to 100."""
    raw = request.args.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiProblem(422, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}.",
                         errors=[{"field": "limit", "message": f"1 to {MAX_LIMIT}"}])
    return int(raw)


def page(session: Session, query: Select[Any], model: Any, present: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """One page of `query` (rows of `model`), newest first, from the request's limit and cursor."""
    limit = parse_limit()
    cursor = request.args.get("cursor")
    if cursor:
        created, last_id = decode_cursor(cursor)
        query = query.where(tuple_(model.created_at, model.id) < tuple_(created, last_id))
    rows = session.execute(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).scalars().all()
    shown = rows[:limit]
    return {
        "object": "list",
        "data": [present(row) for row in shown],
        "next_cursor": encode_cursor(shown[-1]) if len(rows) > limit else None,
    }
