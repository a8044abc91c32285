"""Celery entry point: `celery -A worker.celery_app worker --pool threads -Q interactive`.

Settings come from CLIPMASK_* variables. The model is loaded when the worker is ready (so the
first job doesn't pay for it), in the worker process itself.
"""

import logging
import threading

from celery.signals import celeryd_after_setup, worker_ready

from shared.logs import configure_logging
from shared.settings import Settings
from worker import metrics
from worker.bootstrap import build_worker_app

log = logging.getLogger(__name__)
settings = Settings()
configure_logging(settings.log_level, settings.log_format)
app, get_deps = build_worker_app(settings)


@celeryd_after_setup.connect
def _serve_own_base(sender: object, instance: object, **_kwargs: object) -> None:
    """A worker takes jobs of the base it serves only: started with `-Q interactive,bulk,events`
    (everywhere), a worker whose CLIPMASK_MODEL is not the deployment's default base swaps the
    default base's queues for its own (shared.queue.base_queues)."""
    from shared.queue import base_queues

    own = base_queues(settings, settings.model)
    default = (settings.interactive_queue, settings.bulk_queue)
    if own == default:
        return
    queues = instance.app.amqp.queues  # type: ignore[attr-defined]
    consuming = {q.name for q in queues.consume_from.values()} if queues.consume_from else set(default)
    queues.deselect([name for name in default if name in consuming])
    for default_name, name in zip(default, own, strict=True):
        if default_name in consuming:
            queues.select_add(name)
    log.info("serving base %s: queues %s", settings.model, ", ".join(own))


@worker_ready.connect
def _load_model(**_kwargs: object) -> None:
    metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    deps = get_deps()
    if deps.cancels is not None:  # listening before the first job: its boundaries need not ask
        deps.cancels.start()
    deps.storage.ensure_bucket()
    if settings.dispatcher == "embedded":  # the bulk lane's dispatcher: one process leads, the others stand by
        _start_dispatcher()
    deps.segmenter()
    threading.Thread(target=_warm_matting, name="warm-matting", daemon=True).start()


def _start_dispatcher() -> None:
    from shared.db import make_engine, make_session_factory
    from shared.scheduler import start_in_thread

    engine = make_engine(settings.database_url, pool_size=1)
    start_in_thread(settings, sessions=make_session_factory(engine), celery=app, engine=engine,
                    stop=threading.Event())


def _warm_matting() -> None:
    """refine: matting's kernels compiled in the background at start, not by the first such job."""
    from worker.engine.refine import warm_up

    try:
        log.info("matting kernels ready in %.1f s", warm_up())
    except Exception:  # a worker without them still serves every other job
        log.exception("matting kernels could not be prepared")
