"""Celery entry point: `celery -A worker.celery_app worker --pool threads -Q interactive`.

Settings come from CLIPMASK_* variables. The model is loaded when the worker is ready (so the
first job doesn't pay for it), in the worker process itself.
"""

from celery.signals import worker_ready

from shared.logs import configure_logging
from shared.settings import Settings
from worker import metrics
from worker.bootstrap import build_worker_app

settings = Settings()
configure_logging(settings.log_level, settings.log_format)
app, get_deps = build_worker_app(settings)


@worker_ready.connect
def _load_model(**_kwargs: object) -> None:
    metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    deps = get_deps()
    deps.storage.ensure_bucket()
    deps.segmenter()
