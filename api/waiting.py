"""`Prefer: wait` (RFC 7240): hold a job's answer until it is final, without polling the database.

Every transition into a final state sends `NOTIFY clipmask_job_finished, '<job id>'` in its own
transaction (shared/jobs.py), so Postgres delivers it exactly when the change is visible. Each
API process keeps one LISTEN connection in a background thread (shared/listener.py) and wakes the requests waiting
for that id. A waiting request holds no database connection and no CPU: it sleeps on a
threading.Event in one of gunicorn's gthread threads (api/gunicorn_conf.py), and reads the job
again only when woken: by its notification, by the listener (re)connecting (anything sent while
it was not listening), or by its deadline.

Waiters are capped per API process and per tenant within it (settings `wait_max_per_process`,
`wait_max_per_tenant`): a sleeping waiter still holds one of the process's threads, so without a
cap one tenant's hundreds of waits would take them all, and health checks and other tenants would
queue behind. Past a cap the request is answered at once, as without `Prefer` (RFC 7240 lets a
server ignore a preference), never refused.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from werkzeug.datastructures import Headers

from shared.jobs import JOB_FINISHED_CHANNEL
from shared.listener import JobsListener

log = logging.getLogger(__name__)

MAX_WAIT_S = 60
_WAIT = re.compile(r'^wait(?:=(?:(\d{1,9})|"(\d{1,9})"))?$', re.IGNORECASE)


def preferred_wait(headers: Headers) -> int | None:
    """Seconds asked for by `Prefer: wait[=N]` (plain `wait`: 60; more than 60: 60), or None when
    absent or malformed (a preference we can't read is ignored, RFC 7240 section 2)."""
    for header in headers.getlist("Prefer"):
        for preference in header.split(","):
            token = preference.split(";", 1)[0].strip().replace(" ", "")
            match = _WAIT.match(token)
            if match is None:
                continue
            digits = match.group(1) or match.group(2)
            seconds = MAX_WAIT_S if digits is None else int(digits)
            if seconds < 1:
                return None
            return min(seconds, MAX_WAIT_S)
    return None


class FinishedJobs:
    """The process's one LISTEN connection and the requests waiting on it, by job id."""

    def __init__(self, database_url: str, *, max_waiters: int = 64, max_per_tenant: int = 32) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self.max_waiters, self.max_per_tenant = max_waiters, max_per_tenant
        self._admitted: dict[str, int] = {}  # tenant id -> requests waiting now, in this process
        # started on first use, in the process that serves (gunicorn forks workers); on (re)connect
        # every waiter reads again: whatever finished while nobody listened
        self._listener = JobsListener(database_url, channel=JOB_FINISHED_CHANNEL, on_note=self._wake,
                                      on_connected=lambda: self._wake(None))
        self.listening = self._listener.listening

    @contextmanager
    def watching(self, job_id: str) -> Iterator[threading.Event]:
        """An event set when `job_id` may have finished; register before reading the job, so that a
        finish between the read and the wait is not missed."""
        self._listener.ensure_started()
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[job_id]

    @contextmanager
    def admit(self, tenant_id: str) -> Iterator[bool]:
        """Whether this request may wait (a slot under both caps, held until the block ends)."""
        with self._lock:
            ok = (sum(self._admitted.values()) < self.max_waiters
                  and self._admitted.get(tenant_id, 0) < self.max_per_tenant)
            if ok:
                self._admitted[tenant_id] = self._admitted.get(tenant_id, 0) + 1
        if not ok:
            log.info("wait not granted: %d requests wait in this process (cap %d, %d per tenant)",
                     self.admitted(), self.max_waiters, self.max_per_tenant, extra={"tenant_id": tenant_id})
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    left = self._admitted[tenant_id] - 1
                    if left:
                        self._admitted[tenant_id] = left
                    else:
                        del self._admitted[tenant_id]

    def admitted(self) -> int:
        with self._lock:
            return sum(self._admitted.values())

    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    def _wake(self, job_id: str | None) -> None:
        with self._lock:
            events = [e for events in self._waiters.values() for e in events] if job_id is None else list(
                self._waiters.get(job_id, ()))
        for event in events:
            event.set()


def wait_until(finished: FinishedJobs, job_id: str, seconds: float, read: Callable[[], bool]) -> bool:
    """Wait up to `seconds` for `read()` (which looks at the job, in a session it closes) to say the
    job is final; True if it became final within the time."""
    deadline = time.monotonic() + seconds
    with finished.watching(job_id) as event:
        while True:
            if read():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event.wait(remaining)
            event.clear()
