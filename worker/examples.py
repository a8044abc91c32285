"""Visual-prompt examples fetched by URL, kept a short while per worker process.

A 100,000-item batch sharing one example URL would otherwise fetch it 100,000 times. Each URL's
outcome is kept for `ttl_s` (a fetch or decode failure for `failure_ttl_s`, so a broken URL fails
every job that names it without hammering its host), and at most `capacity` URLs are held, least
recently used evicted first. What is held is the example at the model's input size (352 x 352 RGB,
about 370 KB), never the downloaded bytes or the full-resolution picture.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from shared.errors import JobFailure
from worker.engine.embed import VisualPrompt


class ExampleCache:
    def __init__(self, *, capacity: int = 64, ttl_s: float = 300.0, failure_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.ttl_s, self.failure_ttl_s, self._clock = capacity, ttl_s, failure_ttl_s, clock
        self._items: OrderedDict[str, tuple[float, VisualPrompt | JobFailure]] = OrderedDict()
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, url: str, load: Callable[[], VisualPrompt]) -> VisualPrompt:
        """The example at `url`: held, or `load()`ed now (its JobFailure is held and raised too)."""
        now = self._clock()
        with self._lock:
            held = self._items.get(url)
            if held is not None and held[0] > now:
                self._items.move_to_end(url)
                return self._unwrap(held[1])
        # (two jobs missing the same URL at once may both fetch it: rare, and harmless)
        self.fetches += 1
        outcome: VisualPrompt | JobFailure
        try:
            outcome = load()
        except JobFailure as exc:
            outcome = exc
        ttl = self.failure_ttl_s if isinstance(outcome, JobFailure) else self.ttl_s
        if self.capacity > 0 and ttl > 0:
            with self._lock:
                self._items[url] = (now + ttl, outcome)
                self._items.move_to_end(url)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return self._unwrap(outcome)

    @staticmethod
    def _unwrap(outcome: VisualPrompt | JobFailure) -> VisualPrompt:
        if isinstance(outcome, JobFailure):  # a fresh one each time: re-raising one instance grows its traceback
            raise type(outcome)(outcome.message, code=outcome.code)
        return outcome

    def __len__(self) -> int:
        return len(self._items)
