"""Heartbeat for the jobs a worker process is running: one thread extends their leases every
third of the lease, so a live worker keeps its jobs and a dead one loses them to the reconciler."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from shared import jobs as jobstate
from shared.db import session_scope

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, sessions: sessionmaker[Session], *, lease_s: float) -> None:
        self.sessions = sessions
        self.lease_s = lease_s
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        with self._lock:
            self._held.add(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="clipmask-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(job_id)

    def renew_now(self) -> int:
        with self._lock:
            held = sorted(self._held)
        if not held:
            return 0
        with session_scope(self.sessions) as session:
            return jobstate.renew_leases(session, held, lease_s=self.lease_s)

    def _loop(self) -> None:
        while True:  # a daemon thread: it ends with the worker process
            time.sleep(self.lease_s / 3)
            try:
                self.renew_now()
            except Exception as exc:  # noqa: BLE001 - keep beating; the database may come back
                log.warning("lease renewal failed: %s", exc)
