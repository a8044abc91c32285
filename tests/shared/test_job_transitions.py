"""The worker's per-job transitions (mark_running, mark_succeeded, mark_failed) run as driver SQL
and build their Job from the RETURNING row themselves (shared/jobs.py): that Job must be what the
ORM would have loaded, column by column, and the session around it must not be fooled."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError

from shared import db
from shared import jobs as jobstate
from shared.db import make_engine, make_session_factory, session_scope
from shared.tables import Job


def new_job(sessions, tenant, **values) -> str:
    job_id = str(uuid.uuid4())
    with session_scope(sessions) as session:
        session.add(Job(**{"id": job_id, "tenant_id": tenant.tenant_id, "status": "queued",
                           "input": {"image_url": "http://x/y.jpg"}, "prompts": ["shirt", "pants"], "threshold": 0.4,
                           "results": [], "metadata_": {"sku": "A-1"}, "outputs_requested": ["mask", "rle"],
                           "labels": [{"name": "shirt", "prompts": ["shirt", "tee"], "source": "preset"}],
                           "model_ref": {"id": "m1", "revision": "r1"}, "embed": ["image"], **values}))
    return job_id


def as_loaded(sessions, job_id: str) -> dict[str, object]:
    """Every column attribute as a fresh ORM load gives it."""
    with sessions() as session:
        job = session.get(Job, job_id)
        return {attr.key: getattr(job, attr.key) for attr in sa_inspect(Job).column_attrs}


def columns(job: Job) -> dict[str, object]:
    return {attr.key: getattr(job, attr.key) for attr in sa_inspect(Job).column_attrs}


def test_each_transition_returns_the_job_as_the_orm_loads_it(sessions, storage, tenant):
    job_id = new_job(sessions, tenant, batch_id=None, webhook_events=["job.succeeded"])
    with session_scope(sessions) as session:
        running = jobstate.mark_running(session, job_id, model_id="clipseg", lease_s=60, model_revision="rev-a")
    assert running is not None
    assert columns(running) == as_loaded(sessions, job_id)
    assert (running.status, running.attempts, running.model_revision) == ("running", 1, "rev-a")
    assert running.metadata_ == {"sku": "A-1"} and running.labels[0]["prompts"] == ["shirt", "tee"]
    assert running.lease_expires_at > running.started_at

    results = [{"prompt": "shirt", "bbox": [1, 2, 3, 4], "area_fraction": 0.25, "rle": {"size": [2, 2], "counts": "x"}}]
    with session_scope(sessions) as session:
        done = jobstate.mark_succeeded(session, job_id, results=results, storage=storage,
                                       output_keys={"label_map": "k/label_map.png"}, embedding=[0.5, -0.25],
                                       embedding_model="clipseg", facts={"image_width": 640, "image_height": 480})
    assert done is not None
    assert columns(done.job) == as_loaded(sessions, job_id)
    assert (done.job.status, done.job.results, done.job.output_keys) == ("succeeded", results,
                                                                          {"label_map": "k/label_map.png"})
    assert (done.job.image_width, done.job.image_height, done.job.embedding) == (640, 480, [0.5, -0.25])
    assert done.job.model_revision == "rev-a"  # a fact not given keeps what the job has
    assert done.job.error is None and done.job.lease_expires_at is None

    failed_id = new_job(sessions, tenant)
    with session_scope(sessions) as session:  # queued -> failed: a job that can't even start
        failed = jobstate.mark_failed(session, failed_id, code="image_invalid", message="not an image",
                                      storage=storage, facts={"image_width": 7})
    assert failed is not None
    assert columns(failed.job) == as_loaded(sessions, failed_id)
    assert failed.job.error == {"code": "image_invalid", "message": "not an image"}
    assert failed.job.output_keys is None and failed.job.results == []  # SQL NULL, not JSON null, where absent
    with sessions() as session:
        raw = session.connection().exec_driver_sql(
            "SELECT output_keys IS NULL, embedding IS NULL FROM jobs WHERE id = %(id)s", {"id": failed_id}).one()
    assert tuple(raw) == (True, True)


def test_a_transition_that_does_not_apply_returns_none_and_changes_nothing(sessions, storage, tenant):
    job_id = new_job(sessions, tenant)
    with session_scope(sessions) as session:
        assert jobstate.mark_succeeded(session, job_id, results=[], storage=storage) is None  # not running
    with session_scope(sessions) as session:
        assert jobstate.mark_running(session, job_id, model_id="m", lease_s=60) is not None
    with session_scope(sessions) as session:  # running under a live lease elsewhere: a duplicate message
        assert jobstate.mark_running(session, job_id, model_id="m", lease_s=60) is None
    assert as_loaded(sessions, job_id)["attempts"] == 1
    assert jobstate.mark_running(sessions(), str(uuid.uuid4()), model_id="m", lease_s=60) is None  # no such job


def test_the_returned_job_is_detached_and_a_copy_the_session_holds_is_refreshed(sessions, storage, tenant):
    job_id = new_job(sessions, tenant)
    with session_scope(sessions) as session:
        held = session.get(Job, job_id)
        assert held.status == "queued"
        running = jobstate.mark_running(session, job_id, model_id="m", lease_s=60)
        assert running is not held and sa_inspect(running).detached
        assert held.status == "running" and held.attempts == 1  # reloaded, not the stale copy
    with session_scope(sessions) as session:  # adding it to a session updates the row, never inserts another
        running = session.merge(running)
        running.metadata_ = {"sku": "B-2"}
    assert as_loaded(sessions, job_id)["metadata_"] == {"sku": "B-2"}


def test_a_database_gone_away_is_a_dbapi_error_as_the_runner_expects(tenant, storage):
    sessions = make_session_factory(make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere"))
    with pytest.raises(DBAPIError), session_scope(sessions) as session:  # the runner's TransientError hinges on it
        jobstate.mark_running(session, str(uuid.uuid4()), model_id="m", lease_s=60)
    with pytest.raises(DBAPIError), session_scope(sessions) as session:
        jobstate.mark_succeeded(session, str(uuid.uuid4()), results=[], storage=storage,
                                facts={"image_width": 1})


def test_a_connection_that_broke_is_a_dbapi_error_and_never_handed_out_again(database_url, sessions, storage, tenant,
                                                                              monkeypatch):
    """The transition runs on the driver's cursor: a connection the server dropped under it must
    still come out as SQLAlchemy's DBAPIError (the runner retries the job) and leave the pool."""
    monkeypatch.setattr(db, "PING_IDLE_S", 3600.0)  # no ping at checkout finds it first, however slow the run
    own = make_session_factory(make_engine(database_url, pool_size=1))
    job_id = new_job(sessions, tenant)
    with own() as session:
        session.connection().exec_driver_sql("SELECT 1")
        pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with sessions() as killer:
        killer.connection().exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})
        killer.commit()
    with pytest.raises(DBAPIError) as caught, session_scope(own) as session:
        jobstate.mark_running(session, job_id, model_id="m", lease_s=60)
    assert caught.value.connection_invalidated
    with session_scope(own) as session:  # the pool's one connection is a new one, and the job is still queued
        assert session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
        assert jobstate.mark_running(session, job_id, model_id="m", lease_s=60) is not None


def test_finished_at_is_the_clock_the_worker_gave(sessions, storage, tenant):
    job_id = new_job(sessions, tenant)
    with session_scope(sessions) as session:
        jobstate.mark_running(session, job_id, model_id="m", lease_s=60)
    before = dt.datetime.now(dt.UTC)
    with session_scope(sessions) as session:
        done = jobstate.mark_succeeded(session, job_id, results=[], storage=storage)
    assert done is not None and before <= done.job.finished_at <= dt.datetime.now(dt.UTC)
    assert done.job.finished_at.tzinfo is not None
