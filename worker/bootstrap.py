"""Everything a worker process needs, built from the settings (no work at import time)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.exc import DBAPIError

from shared.db import make_engine, make_session_factory, session_scope
from shared.fetch import policy_from_settings
from shared.followups import Effects, after_commit
from shared.queue import make_celery
from shared.settings import Settings
from shared.storage import ObjectStorage
from worker import metrics
from worker.deps import RunnerDeps, Segments
from worker.engine.refine import PixelBudget
from worker.leases import LeaseKeeper
from worker.outputs import InstanceRules
from worker.stops import CancelWatch

log = logging.getLogger(__name__)


class LazySegmenter:
    """Loads the model once per worker process, on first use, in the process that uses it
    (never before a fork; with the threads pool nothing forks at all)."""

    def __init__(self, settings: Settings, on_load: Callable[[Any], None] | None = None) -> None:
        self.settings = settings
        self.on_load = on_load
        self._lock = threading.Lock()
        self._segmenter: Any = None

    @property
    def loaded_revision(self) -> str | None:
        """The loaded model's revision, None before it loads (never loads it)."""
        return None if self._segmenter is None else getattr(self._segmenter, "model_revision", None)

    def __call__(self) -> Segments:
        if self._segmenter is None:
            with self._lock:
                if self._segmenter is None:
                    from worker.engine import open_segmenter

                    s = self.settings
                    self._segmenter = open_segmenter(
                        s.model, device=s.device, dtype=s.dtype, cpu_dtype=s.cpu_dtype, kind=s.engine,
                        max_batch_images=s.max_batch_images, max_batch_wait_ms=s.max_batch_wait_ms,
                        text_cache_size=s.text_cache_size, torch_compile=s.torch_compile,
                        device_decode=s.device_decode,
                        on_batch=metrics.on_batch,
                    )
                    if self.on_load is not None:
                        self.on_load(self._segmenter)
        segmenter: Segments = self._segmenter
        return segmenter


def build_deps(settings: Settings, celery: Celery) -> RunnerDeps:
    engine = make_engine(settings.database_url, pool_size=settings.worker_concurrency)
    storage = ObjectStorage(settings)
    sessions = make_session_factory(engine)

    def follow_up(effects: Effects) -> None:
        after_commit(celery, sessions, effects)

    def served(segmenter: Any) -> None:
        """Record the base this worker serves, so uploads of fine-tuned decoders can be checked against it."""
        from shared.tuned_models import record_base
        from worker.engine.finetuned import decoder_tensors

        model = segmenter.loaded.model
        family = getattr(segmenter, "family", "clipseg")
        shapes, projection = {}, 0
        if family == "clipseg":  # what a fine-tuned decoder must fit (fine-tuning is CLIPSeg's)
            shapes = {name: list(t.shape) for name, t in decoder_tensors(model).items()}
            projection = int(model.config.projection_dim)
        try:
            with session_scope(sessions) as session:
                record_base(session, model_id=settings.model, revision=segmenter.model_revision, decoder=shapes,
                            projection_dim=projection, family=family)
        except DBAPIError as exc:  # the next start records it; jobs don't depend on it
            log.warning("could not record the served base model: %s", exc)
        threading.Thread(target=_serving, name="clipmask-served-base", daemon=True).start()

    def _serving() -> None:
        """Say every served_base_beat_s that this base is still served (GET /v1/models' `served`; a
        base no worker served for a day is no longer listed or accepted)."""
        from shared.tuned_models import touch_base

        while True:  # a daemon thread: it ends with the worker process
            time.sleep(settings.served_base_beat_s)
            try:
                with session_scope(sessions) as session:
                    touch_base(session, model_id=settings.model)
            except DBAPIError as exc:
                log.warning("could not say the base is still served: %s", exc)

    return RunnerDeps(sessions, storage, LazySegmenter(settings, on_load=served), policy_from_settings(settings),
                      settings.max_image_pixels, settings.model, on_stage=metrics.on_stage, on_finish=metrics.on_finish,
                      lease_s=settings.job_lease_s, leases=LeaseKeeper(sessions, lease_s=settings.job_lease_s),
                      follow_up=follow_up, matting_max_pixels=settings.matting_max_pixels,
                      matting_budget=PixelBudget(settings.matting_process_pixels),
                      cancels=CancelWatch(settings.database_url), max_attempts=settings.job_max_attempts,
                      instances=InstanceRules(settings.instances_min_fraction, settings.max_instances))


def build_worker_app(settings: Settings) -> tuple[Celery, Callable[[], RunnerDeps]]:
    """The Celery app with the clipmask tasks registered, and the function that builds (once, on
    first use) the dependencies they share; passed back explicitly, not hung on the app's config."""
    from worker.tasks import register_tasks

    app = make_celery(settings)
    deps: dict[str, RunnerDeps] = {}
    lock = threading.Lock()

    def get_deps() -> RunnerDeps:
        with lock:
            if "deps" not in deps:
                deps["deps"] = build_deps(settings, app)
            return deps["deps"]

    register_tasks(app, get_deps, settings=settings)
    return app, get_deps
