"""One LISTEN connection on one of the jobs' channels, in a daemon thread of the process that uses it.

Every transition into a final state sends `NOTIFY clipmask_job_finished, '<job id>'` in its own
transaction, and a cancel also `clipmask_job_canceled` (shared/jobs.py), so Postgres delivers them
exactly when the change is visible. Two readers use this loop: the API's `Prefer: wait` on the
finished channel (api/waiting.py wakes the requests waiting for an id) and the worker's
stage-boundary checks on the canceled one (worker/stops.py: a job canceled elsewhere stops its run
without the run asking the database between stages; a worker hears only cancels, which are rare,
not every job every worker finishes).

`generation` counts the connections that have LISTENed: a reader that saw the same generation
before and after a stretch of time knows that nothing sent in between was missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import make_url

from shared.jobs import JOB_CANCELED_CHANNEL, JOB_FINISHED_CHANNEL

log = logging.getLogger(__name__)


class JobsListener:
    """`on_note(job_id)` for each notification on `channel`; `on_connected()` after each (re)connect,
    when whatever was sent while nobody listened must be read again."""

    def __init__(self, database_url: str, *, channel: str, on_note: Callable[[str], None],
                 on_connected: Callable[[], None]) -> None:
        if channel not in (JOB_FINISHED_CHANNEL, JOB_CANCELED_CHANNEL):
            raise ValueError(f"not a jobs channel: {channel!r}")
        self._dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.channel, self._on_note, self._on_connected = channel, on_note, on_connected
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.listening = threading.Event()
        self.generation = 0
        self.backend_pid: int | None = None  # the LISTEN connection's server process

    def ensure_started(self) -> None:
        with self._lock:  # started on first use, in the process that uses it (gunicorn and Celery fork)
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.listening.clear()
            self._thread = threading.Thread(target=self._listen, name=f"listen-{self.channel}", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        import psycopg

        backoff, failures = 0.5, 0
        while True:
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=3, keepalives=1,
                                     keepalives_idle=30, keepalives_interval=10, keepalives_count=3) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.backend_pid = conn.info.backend_pid
                    self.generation += 1
                    self.listening.set()
                    backoff, failures = 0.5, 0
                    self._on_connected()
                    for note in conn.notifies():
                        self._on_note(note.payload)
            except Exception as exc:  # noqa: BLE001 - keep listening whatever happens; readers fall back meanwhile
                self.listening.clear()
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "%s listener has no connection (%s); retrying every %.1f s at most", self.channel, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
