"""Thin Celery tasks: take an id, call the runner, retry what is transient."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery, Task

from shared.queue import RECONCILE_TASK, RETENTION_TASK, SEGMENT_TASK
from shared.reconcile import reconcile_from_settings
from shared.retention import purge_from_settings
from shared.settings import Settings
from worker.runner import RunnerDeps, TransientError, run_job


def register_tasks(app: Celery, get_deps: Callable[[], RunnerDeps], *, settings: Settings) -> None:
    max_retries = settings.job_max_retries

    @app.task(name=SEGMENT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=max_retries)
    def segment(self: Task, job_id: str) -> str:
        try:
            return run_job(job_id, deps=get_deps())
        except TransientError as exc:
            raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc

    @app.task(name=RECONCILE_TASK, acks_late=True)
    def reconcile_jobs() -> dict[str, int]:
        report = reconcile_from_settings(settings, sessions=get_deps().sessions, celery=app)
        return {"requeued_running": len(report.requeued_running), "reenqueued_queued": len(report.reenqueued_queued)}

    @app.task(name=RETENTION_TASK, acks_late=True)
    def retention() -> int:
        deps = get_deps()
        return purge_from_settings(settings, sessions=deps.sessions, storage=deps.storage)
