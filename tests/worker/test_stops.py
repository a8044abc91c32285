"""A run's stage boundaries hear of cancels on Postgres' canceled-jobs channel instead of asking the
database each time (worker/stops.py): no round trip for a job nobody touched, a cancel heard is
acted on at the next boundary, and a listener that can't vouch for having heard everything (not
connected, or reconnected since the run began) sends the boundary back to the database."""

from __future__ import annotations

import dataclasses
import time
from unittest import mock

import psycopg

from shared import jobs as jobstate
from shared.db import session_scope
from tests.support.services import admin_dsn
from tests.worker.test_runner import deps, load, new_upload_job  # noqa: F401 - deps is a fixture
from worker.runner import run_job
from worker.stops import CancelWatch


def _eventually(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_job_nobody_touched_runs_without_a_status_query(deps, sessions, storage, tenant):  # noqa: F811
    deps.cancels.start()
    _eventually(deps.cancels.listening.is_set, "the listener never connected")
    job_id = new_upload_job(sessions, storage, tenant)
    with mock.patch.object(jobstate, "status_of", wraps=jobstate.status_of) as asked:
        assert run_job(job_id, deps=deps) == "succeeded"
    assert asked.call_count == 0  # before: one query after the fetch and one before the uploads
    assert load(sessions, job_id).status == "succeeded"


def test_a_cancel_is_heard_for_the_watched_job_only(settings, deps, sessions, storage, tenant):  # noqa: F811
    watch = CancelWatch(settings.database_url)
    watch.start()
    _eventually(watch.listening.is_set, "the listener never connected")
    failed, canceled, other = (new_upload_job(sessions, storage, tenant) for _ in range(3))
    with watch.watching(failed), watch.watching(canceled), watch.watching(other):
        assert not any(watch.may_be_canceled(job) for job in (failed, canceled, other))
        with session_scope(sessions) as session:  # a job finishing otherwise is not a cancel
            jobstate.mark_failed(session, failed, code="internal", message="x", storage=storage)
        with session_scope(sessions) as session:
            jobstate.cancel(session, canceled, storage=storage)
        _eventually(lambda: watch.may_be_canceled(canceled), "the cancel was never heard")
        assert not watch.may_be_canceled(other) and not watch.may_be_canceled(failed)
    assert watch.may_be_canceled(canceled)  # no longer watched: nothing to vouch for


def test_a_reconnected_listener_sends_boundaries_to_the_database(settings, sessions, storage, tenant):
    """Whatever was sent while the listener's connection was down is lost to it, so a run that
    began before the drop asks again, even after the listener is back."""
    watch = CancelWatch(settings.database_url)
    watch.start()
    _eventually(watch.listening.is_set, "the listener never connected")
    job_id = new_upload_job(sessions, storage, tenant)
    with watch.watching(job_id):
        assert not watch.may_be_canceled(job_id)
        before = watch._listener.generation
        with psycopg.connect(admin_dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [watch._listener.backend_pid])
        _eventually(lambda: watch._listener.generation > before and watch.listening.is_set(),
                    "the listener never came back")
        assert watch.may_be_canceled(job_id)
    with watch.watching(job_id):  # a run that begins on the new connection is vouched for again
        assert not watch.may_be_canceled(job_id)


def test_without_a_listener_every_boundary_asks_and_a_cancel_still_stops_the_job(deps, sessions, storage,  # noqa: F811
                                                                                 tenant):
    deaf = dataclasses.replace(deps, cancels=CancelWatch("postgresql://postgres@127.0.0.1:1/nothing"))
    job_id = new_upload_job(sessions, storage, tenant)
    real = deps.segmenter()

    class CancelingSegmenter:
        def run(self, request):
            with session_scope(sessions) as session:  # no waiting for a NOTIFY: the database is asked
                jobstate.cancel(session, job_id, storage=storage)
            return real.run(request)

    with (mock.patch.object(deaf, "segmenter", lambda: CancelingSegmenter()),
          mock.patch.object(jobstate, "status_of", wraps=jobstate.status_of) as asked,
          mock.patch.object(storage, "put", wraps=storage.put) as put):
        assert run_job(job_id, deps=deaf) == "canceled"
    assert asked.call_count >= 1 and put.call_count == 0
    assert load(sessions, job_id).status == "canceled"
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []
