"""Thin Celery tasks: take an id, call the runner, retry what is transient."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery, Task

from shared.queue import SEGMENT_TASK
from worker.runner import RunnerDeps, TransientError, run_job


def register_tasks(app: Celery, get_deps: Callable[[], RunnerDeps], *, max_retries: int) -> None:
    @app.task(name=SEGMENT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=max_retries)
    def segment(self: Task, job_id: str) -> str:
        try:
            return run_job(job_id, deps=get_deps())
        except TransientError as exc:
            raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc
