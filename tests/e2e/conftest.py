"""Fixtures the end-to-end modules share: the API over real HTTP beside the session's worker, and a
worker with an embedded beat on queues of its own."""

from __future__ import annotations

import uuid

import pytest

from api import create_app
from tests.support.services import serving, start_worker, stop_process


@pytest.fixture(scope="module")
def api_url(settings, storage, worker):
    """The API served over real HTTP (the CLI and the client reach it as users do)."""
    with serving(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def wh_settings(settings):
    suffix = "wh"
    return settings.model_copy(update={
        "interactive_queue": f"{settings.interactive_queue}-{suffix}", "bulk_queue": f"{settings.bulk_queue}-{suffix}",
        "events_queue": f"{settings.events_queue}-{suffix}", "worker_metrics_port": 0,
        "webhook_retry_schedule_s": [1.0, 1.0, 1.0], "webhook_dispatch_interval_s": 0.5, "webhook_timeout_s": 5,
    })


@pytest.fixture(scope="module")
def wh_worker(wh_settings, storage, tmp_path_factory):
    proc = start_worker(wh_settings, tmp_path_factory.mktemp("wh") / "worker.log",
                        name=f"wh-{uuid.uuid4().hex[:6]}", beat=True)
    yield proc
    stop_process(proc)


@pytest.fixture()
def wh_client(wh_settings, wh_worker):
    return create_app(wh_settings).test_client()
