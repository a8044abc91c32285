"""The engine's pool: a connection idle past PING_IDLE_S is pinged before use, so one the server
dropped meanwhile (a restart, an idle timeout) is replaced instead of failing the request."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from shared import db
from shared.db import make_engine
from tests.support.services import admin_dsn


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def _drop(pid: int) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_a_dropped_idle_connection_is_replaced_before_use(database_url, monkeypatch):
    engine = make_engine(database_url, pool_size=1)
    first = _backend_pid(engine)
    _drop(first)
    monkeypatch.setattr(db, "PING_IDLE_S", 0.0)  # every checked-in connection counts as idle
    assert _backend_pid(engine) != first  # answered, on a new connection
    engine.dispose()


def test_a_connection_in_steady_use_is_not_pinged(database_url, monkeypatch):
    engine = make_engine(database_url, pool_size=1)
    first = _backend_pid(engine)
    _drop(first)
    monkeypatch.setattr(db, "PING_IDLE_S", 3600.0)  # just used: no round trip is spent on a ping
    with pytest.raises(OperationalError):  # so the use finds the drop out (the API answers 503)
        _backend_pid(engine)
    assert _backend_pid(engine) != first  # and the pool has replaced it for the next
    engine.dispose()
