"""A dynamic batcher in the manner of Triton's: gather requests from many threads into one
forward pass, up to `max_batch` images or `max_wait_ms` after the first one arrived.

One inference thread owns the device. Caller threads (Celery's thread pool) do the I/O - fetch,
decode, PNG encoding, uploads - and block only on their own request's future, so that I/O
overlaps with the model and CUDA is only ever touched from one thread of one process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

_STOP = object()


class DynamicBatcher(Generic[Req, Res]):
    def __init__(
        self, run_batch: Callable[[Sequence[Req]], list[Res]], *, max_batch: int, max_wait_ms: float,
        name: str = "clipmask-inference", on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[object] = queue.Queue()
        self.batch_sizes: list[int] = []  # recent batch sizes, for metrics and tests
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Req) -> Future[Res]:
        future: Future[Res] = Future()
        self._queue.put((request, future))
        return future

    def __call__(self, request: Req, timeout: float | None = None) -> Res:
        return self.submit(request).result(timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _gather(self, first: object) -> tuple[list[tuple[Req, Future[Res]]], bool]:
        batch: list[object] = [first]
        deadline = time.monotonic() + self.max_wait_s
        stop = False
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop  # type: ignore[return-value]

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            live = [(req, fut) for req, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if stop:
                return

    def _run(self, batch: list[tuple[Req, Future[Res]]]) -> None:
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = self._run_batch([req for req, _ in batch])
        except Exception as exc:  # noqa: BLE001 - isolate the bad request, keep the others
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
            for item in batch:
                self._run([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
