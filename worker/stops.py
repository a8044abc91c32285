"""Which of this process's running jobs were canceled, heard, not asked.

A run checks at its stage boundaries (after the fetch, before inference, before the uploads)
whether its job was canceled meanwhile. Asking the database each time was a round trip per
boundary per job. Instead the process LISTENs on the channel every cancel notifies
(shared/listener.py; a cancel by the API or by a batch cancel alike), and a boundary asks the
database only when it heard something for that job, or when it cannot vouch for having heard
everything since the run began (the listener was not connected then, or has reconnected since).
Only cancels are sent there, so a worker doesn't read a notification for every job every other
worker finishes.

A cancel the listener has not heard yet (NOTIFY arrives a millisecond or so after the commit)
lets the run go on to the next boundary; one not heard before the uploads is still caught by
the final commit, which is conditional on the job running and deletes what was uploaded. So
the listener saves work and round trips; correctness never depends on it. A run whose job another
run finished, or the reconciler requeued, hears nothing: it goes on to its final commit, which
fails on the status and deletes nothing (the keys are deterministic).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from shared.jobs import JOB_CANCELED_CHANNEL
from shared.listener import JobsListener


class CancelWatch:
    def __init__(self, database_url: str) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, int] = {}  # job id -> the listener's generation when its run began (0: unknown)
        self._heard: set[str] = set()
        self._listener = JobsListener(database_url, channel=JOB_CANCELED_CHANNEL, on_note=self._note,
                                      on_connected=lambda: None)
        self.listening = self._listener.listening

    def start(self) -> None:
        self._listener.ensure_started()

    @contextmanager
    def watching(self, job_id: str) -> Iterator[None]:
        """Hear of `job_id` from here on: enter before the run takes the job (mark_running), so a
        cancel committed after that is not missed."""
        self._listener.ensure_started()
        with self._lock:
            self._watched[job_id] = self._listener.generation if self.listening.is_set() else 0
            self._heard.discard(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(job_id, None)
                self._heard.discard(job_id)

    def may_be_canceled(self, job_id: str) -> bool:
        """False only when nothing was heard for the job and the listener has been connected, on
        one connection, since its watch began: then the database has nothing new to say."""
        with self._lock:
            if job_id in self._heard:
                return True
            since = self._watched.get(job_id, 0)
        return since == 0 or not self.listening.is_set() or since != self._listener.generation

    def _note(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._watched:
                self._heard.add(job_id)
