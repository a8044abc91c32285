"""Engine and session factories. One engine per process, sessions scoped per request or task."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

# A pooled connection idle longer than this is pinged before use (a database restarted meanwhile
# is found out there, not by the request). One in steady use is not: the ping was a round trip on
# every checkout, a sixth of a job create's time (py-spy, bench/api.py). A connection that breaks
# in use still invalidates the pool, and that request answers 503.
PING_IDLE_S = 1.0


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """An engine with short connect timeouts, so a dead database answers fast instead of hanging."""
    engine = create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=5,
        connect_args={"connect_timeout": 3},
    )
    event.listen(engine, "checkin", _checked_in)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def _checked_in(dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    since = record.info.get("idle_since")
    if since is None or time.monotonic() - since < PING_IDLE_S:
        return  # new, or in steady use
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as error:  # the pool discards it and checks out another (a fresh one if need be)
        raise exc.DisconnectionError() from error


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
