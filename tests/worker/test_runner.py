"""The job runner called directly (no broker) with real Postgres, S3 and the tiny model."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from unittest import mock

import numpy as np
import pytest

from shared import jobs as jobstate
from shared.clock import utcnow
from shared.db import session_scope
from shared.errors import StorageFailed
from shared.queue import make_celery
from shared.storage import mask_key, upload_key
from shared.tables import Job
from tests.support.images import make_image
from worker.bootstrap import build_deps
from worker.deps import TransientError
from worker.runner import run_job


@pytest.fixture(scope="module")
def deps(settings, storage):
    built = build_deps(settings, make_celery(settings))
    yield built
    built.segmenter().close()


def new_upload_job(sessions, storage, tenant, *, prompts=("shirt", "pants"), status="queued") -> str:
    job_id = str(uuid.uuid4())
    key = upload_key(tenant_id=tenant.tenant_id, job_id=job_id)
    data = make_image(64, 48, fmt="PNG")
    storage.put(key, data, content_type="image/png")
    with session_scope(sessions) as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status=status, upload_key=key,
                        input={"upload": {"filename": None, "content_type": "image/png", "bytes": len(data)}},
                        prompts=list(prompts), threshold=0.4, results=[], metadata_={}))
    return job_id


def load(sessions, job_id) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_runs_to_succeeded_and_writes_one_mask_per_prompt(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    assert run_job(job_id, deps=deps) == "succeeded"
    job = load(sessions, job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.model_id == deps.model_id
    assert [r["mask_key"] for r in job.results] == [
        mask_key(tenant_id=tenant.tenant_id, job_id=job_id, index=i) for i in range(2)]
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == [r["mask_key"] for r in job.results]


def test_redelivered_message_for_a_finished_job_changes_nothing(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    run_job(job_id, deps=deps)
    before = load(sessions, job_id)
    assert run_job(job_id, deps=deps) == "skipped"
    after = load(sessions, job_id)
    assert (after.status, after.results, after.finished_at, after.attempts) == (
        before.status, before.results, before.finished_at, before.attempts)


def test_rerun_of_a_running_job_overwrites_the_same_keys(deps, sessions, storage, tenant):
    """A worker died mid-job; the message comes back: same object keys, one set of results."""
    job_id = new_upload_job(sessions, storage, tenant, status="running")
    assert run_job(job_id, deps=deps) == "succeeded"
    keys = storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/")
    assert len(keys) == 2 and len(load(sessions, job_id).results) == 2


def test_canceled_job_is_not_run(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant, status="canceled")
    assert run_job(job_id, deps=deps) == "skipped"
    assert load(sessions, job_id).status == "canceled"
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []


def test_cancel_during_inference_is_not_overwritten(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    real = deps.segmenter()

    class CancelingSegmenter:
        def run(self, request):
            with session_scope(sessions) as session:  # the user cancels while the model runs
                jobstate.cancel(session, job_id, storage=storage)
            deadline = time.monotonic() + 10  # ... and the worker hears of it (NOTIFY) before the model is done
            while not deps.cancels.may_be_canceled(job_id):
                assert time.monotonic() < deadline, "the worker never heard of the cancel"
                time.sleep(0.01)
            return real.run(request)

    with (mock.patch.object(deps, "segmenter", lambda: CancelingSegmenter()),
          mock.patch.object(deps.storage, "put", wraps=deps.storage.put) as put):  # a spy: what was written
        assert run_job(job_id, deps=deps) == "canceled"
    job = load(sessions, job_id)
    assert job.status == "canceled" and job.results == []
    assert put.call_count == 0  # stopped before the first upload, not written and deleted afterwards
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []


def test_a_cancel_during_the_uploads_leaves_no_masks(deps, sessions, storage, tenant):
    """A job's uploads go up together; a cancel that lands while they run is seen by the final
    commit, and every mask they wrote is deleted."""
    job_id = new_upload_job(sessions, storage, tenant)
    real_put = deps.storage.put
    canceled = threading.Lock()

    def put_then_cancel(key, data, **kwargs):
        real_put(key, data, **kwargs)
        if canceled.acquire(blocking=False):  # the user cancels after the first mask went up
            with session_scope(sessions) as session:
                jobstate.cancel(session, job_id, storage=storage)

    with mock.patch.object(deps.storage, "put", side_effect=put_then_cancel) as put:
        assert run_job(job_id, deps=deps) == "canceled"
    assert put.call_count == 2
    assert load(sessions, job_id).status == "canceled"
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []


def test_a_jobs_uploads_run_at_once_and_a_failure_waits_for_the_rest(storage):
    """upload_all: the PUTs overlap (4 PUTs of 0.3 s take well under 1.2 s), and a failing one is
    raised only after the others ended."""
    from worker.outputs import upload_all

    ended: list[str] = []

    def slow_put(key, data, **kwargs):
        time.sleep(0.3)
        if key == "bad":
            raise StorageFailed("S3 said no")
        ended.append(key)

    with mock.patch.object(storage, "put", side_effect=slow_put):
        started = time.monotonic()
        upload_all(storage, [(f"k{i}", b"x", "image/png") for i in range(4)])
        assert time.monotonic() - started < 0.9 and sorted(ended) == ["k0", "k1", "k2", "k3"]
        ended.clear()
        with pytest.raises(StorageFailed):
            upload_all(storage, [("bad", b"x", "image/png"), ("k1", b"x", "image/png"), ("k2", b"x", "image/png")])
        assert sorted(ended) == ["k1", "k2"]


def test_storage_failure_fails_the_job_with_storage_failed(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    with mock.patch.object(deps.storage, "put", side_effect=StorageFailed("S3 said no")):
        assert run_job(job_id, deps=deps) == "failed"
    job = load(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "storage_failed" and job.results == []


def test_unexpected_error_fails_with_internal(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)

    class Broken:
        def run(self, request):
            raise RuntimeError("CUDA error: device-side assert")

    with mock.patch.object(deps, "segmenter", lambda: Broken()):
        assert run_job(job_id, deps=deps) == "failed"
    job = load(sessions, job_id)
    assert job.error == {"code": "internal", "message": "RuntimeError: CUDA error: device-side assert"}
    # the image was decoded before the model failed: its size is on the failed job (written by the
    # transition to failed, as a succeeded job's is by its own)
    assert (job.image_width, job.image_height) == (64, 48)


def test_database_down_is_transient(deps, settings):
    from shared.db import make_engine, make_session_factory

    dead = make_session_factory(make_engine("postgresql+psycopg://postgres@127.0.0.1:9/none", pool_size=1))
    with mock.patch.object(deps, "sessions", dead), pytest.raises(TransientError):
        run_job(str(uuid.uuid4()), deps=deps)



def test_duplicate_message_while_leased_elsewhere_is_skipped(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant, status="queued")
    with session_scope(sessions) as session:  # another worker holds it, lease live
        assert jobstate.mark_running(session, job_id, model_id="m", lease_s=300) is not None
    assert run_job(job_id, deps=deps) == "skipped"
    with session_scope(sessions) as session:  # that worker died: its lease ran out
        session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)
    assert run_job(job_id, deps=deps) == "succeeded"
    job = load(sessions, job_id)
    assert job.attempts == 2 and job.lease_expires_at is None


def started_deliveries(sessions, job_id) -> list:
    from sqlalchemy import select

    from shared.tables import WebhookDelivery

    with sessions() as session:
        return list(session.execute(select(WebhookDelivery.event_type).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event_type == "job.started")).scalars())


def with_webhook(sessions, job_id, events) -> None:
    with session_scope(sessions) as session:  # (nothing listens there: a send fails at once)
        job = session.get(Job, job_id)
        job.webhook_url, job.webhook_events = "http://127.0.0.1:9/hook", events


def test_job_started_is_sent_once_even_when_the_job_runs_again(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    with_webhook(sessions, job_id, ["job.started", "job.succeeded"])
    with session_scope(sessions) as session:  # a first worker took it, then died mid-job
        taken = jobstate.mark_running(session, job_id, model_id="m", lease_s=300)
        assert jobstate.started_event(session, taken, storage) != ()
    with session_scope(sessions) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)
    assert run_job(job_id, deps=deps) == "succeeded"  # the retry: attempt 2
    assert started_deliveries(sessions, job_id) == ["job.started"]
    assert load(sessions, job_id).attempts == 2


def test_job_started_only_when_asked_for(deps, sessions, storage, tenant):
    asked, default = new_upload_job(sessions, storage, tenant), new_upload_job(sessions, storage, tenant)
    with_webhook(sessions, asked, ["job.started"])
    with_webhook(sessions, default, None)  # the default set: the three final events
    assert run_job(asked, deps=deps) == run_job(default, deps=deps) == "succeeded"
    assert started_deliveries(sessions, asked) == ["job.started"]
    assert started_deliveries(sessions, default) == []


def test_the_job_records_the_model_that_ran_it(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    revision = deps.segmenter().model_revision
    seen_running = []
    real_put = deps.storage.put

    def put_and_look(key, data, **kwargs):  # while the job runs: the model (and revision) is already on it
        seen_running.append(load(sessions, job_id).model_revision)
        real_put(key, data, **kwargs)

    with mock.patch.object(deps.storage, "put", side_effect=put_and_look):
        run_job(job_id, deps=deps)
    job = load(sessions, job_id)
    assert job.model_id == deps.model_id
    assert job.model_revision == revision and revision.startswith("sha256:") and seen_running[0] == revision
    assert (job.image_width, job.image_height) == (64, 48)


@pytest.mark.parametrize("first_finishes", ["first_run", "second_run"])
def test_two_runs_of_one_job_never_delete_what_the_finished_row_points_at(deps, sessions, storage, tenant,
                                                                          first_finishes):
    """A worker paused past its lease; the reconciler's second run takes the job over. Whichever run
    finishes second stops without deleting: the keys are the same, and the succeeded row points at them."""
    import threading

    job_id = new_upload_job(sessions, storage, tenant)
    real = deps.segmenter()
    go = {"first": threading.Event(), "second": threading.Event()}
    inferring = {"first": threading.Event(), "second": threading.Event()}
    outcome: dict[str, str] = {}

    class Paused:  # each run waits at its inference until the test lets it go
        def run(self, request):
            name = threading.current_thread().name
            inferring[name].set()
            assert go[name].wait(30)
            return real.run(request)

    def run():
        outcome[threading.current_thread().name] = run_job(job_id, deps=deps)

    paused = Paused()
    patch = mock.patch.object(deps, "segmenter", lambda: paused)
    patch.start()
    try:
        first = threading.Thread(target=run, name="first")
        first.start()
        assert inferring["first"].wait(30)
        with session_scope(sessions) as session:  # the first worker's lease ran out while it was paused
            session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)
        second = threading.Thread(target=run, name="second")
        second.start()
        assert inferring["second"].wait(30)
        threads = {"first": first, "second": second}
        order = ("first", "second") if first_finishes == "first_run" else ("second", "first")
        for name in order:
            go[name].set()
            threads[name].join(60)
    finally:
        for event in go.values():
            event.set()
        patch.stop()
    assert outcome[order[0]] == "succeeded" and outcome[order[1]] == "superseded"
    job = load(sessions, job_id)
    assert job.status == "succeeded" and job.attempts == 2
    for result in job.results:  # every object the row points at is there
        assert storage.get(result["mask_key"]).startswith(b"\x89PNG")


def test_a_run_whose_job_was_requeued_stops_without_deleting(deps, sessions, storage, tenant):
    """Taken back (queued again) while this run was uploading: the next run owns the keys."""
    job_id = new_upload_job(sessions, storage, tenant)
    real_put = deps.storage.put

    def put_then_requeue(key, data, **kwargs):
        real_put(key, data, **kwargs)
        with session_scope(sessions) as session:
            jobstate.requeue(session, job_id)

    with mock.patch.object(deps.storage, "put", side_effect=put_then_requeue) as put:
        assert run_job(job_id, deps=deps) == "superseded"
    assert put.call_count == 2  # (the job's uploads go up together)
    assert len(storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/")) == 2  # not deleted
    assert load(sessions, job_id).status == "queued"


def example_job(sessions, storage, tenant, example_url: str) -> str:
    job_id = new_upload_job(sessions, storage, tenant, prompts=())
    with session_scope(sessions) as session:
        session.get(Job, job_id).labels = [{"name": "pattern", "prompts": [], "source": "image",
                                            "example": {"image_url": example_url}}]
    return job_id


def test_an_example_url_shared_by_many_jobs_is_fetched_once(deps, sessions, storage, tenant, image_server):
    """A batch whose items share one image prompt URL fetches it once per worker process a while,
    not once per item; the example is kept at the model's input size, not as decoded."""
    url = image_server.add(f"/example-{uuid.uuid4().hex[:8]}.jpg", make_image(1600, 1200))
    path = url[len(image_server.base):]
    jobs = [example_job(sessions, storage, tenant, url) for _ in range(4)]
    assert [run_job(job_id, deps=deps) for job_id in jobs] == ["succeeded"] * 4
    assert image_server.hits[path] == 1
    held = [entry for _, entry in deps.examples._items.values() if getattr(entry, "digest", None)]
    size = deps.segmenter().input_size
    assert held and all(entry.pixels.shape == (size[1], size[0], 3) for entry in held)


def test_a_broken_example_url_fails_each_job_without_refetching(deps, sessions, storage, tenant, image_server):
    url = image_server.add(f"/gone-{uuid.uuid4().hex[:8]}.jpg", b"", status=404)
    path = url[len(image_server.base):]
    jobs = [example_job(sessions, storage, tenant, url) for _ in range(3)]
    assert [run_job(job_id, deps=deps) for job_id in jobs] == ["failed"] * 3
    for job_id in jobs:
        error = load(sessions, job_id).error
        assert error["code"] == "image_fetch_failed" and error["message"].startswith("image_prompts[0] ('pattern')")
    assert image_server.hits[path] == 1


@pytest.mark.unit
def test_the_example_cache_expires_and_is_bounded():
    from shared.errors import ImageFetchFailed
    from worker.engine.embed import VisualPrompt
    from worker.examples import ExampleCache

    now = [0.0]
    cache = ExampleCache(capacity=2, ttl_s=10, failure_ttl_s=1, clock=lambda: now[0])
    loads: list[str] = []

    def loader(name: str, fail: bool = False):
        def load():
            loads.append(name)
            if fail:
                raise ImageFetchFailed("404")
            return VisualPrompt.of(np.zeros((4, 4, 3), dtype=np.uint8))
        return load

    cache.get("a", loader("a"))
    cache.get("a", loader("a"))
    now[0] = 11
    cache.get("a", loader("a"))  # expired: fetched again
    assert loads == ["a", "a"]
    for _ in range(2):
        with pytest.raises(ImageFetchFailed):
            cache.get("bad", loader("bad", fail=True))
    now[0] = 12.5  # failures are kept a shorter while
    with pytest.raises(ImageFetchFailed):
        cache.get("bad", loader("bad", fail=True))
    assert loads == ["a", "a", "bad", "bad"]
    cache.get("c", loader("c"))
    assert len(cache) == 2 and "a" not in cache._items  # least recently used went first


def taken_by_a_worker_that_died(sessions, job_id: str) -> None:
    """A worker takes the job and dies under it (kill -9, out of memory): its lease runs out."""
    with session_scope(sessions) as session:
        assert jobstate.mark_running(session, job_id, model_id="m", lease_s=300) is not None
    with session_scope(sessions) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)


def test_a_job_taken_max_attempts_times_fails_attempts_exhausted(deps, sessions, storage, tenant):
    """A poison job (it kills its worker each time) is not run forever: the take after the last
    attempt fails it, with its final event, and attempts never pass the cap."""
    assert deps.max_attempts == 3  # CLIPMASK_JOB_MAX_ATTEMPTS' default
    job_id = new_upload_job(sessions, storage, tenant)
    with_webhook(sessions, job_id, None)
    for _ in range(3):
        taken_by_a_worker_that_died(sessions, job_id)
    def no_model():
        raise AssertionError("an exhausted job must not run")

    with mock.patch.object(deps, "segmenter", no_model):
        assert run_job(job_id, deps=deps) == "failed"
    job = load(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "attempts_exhausted" and job.attempts == 3
    assert "3 times" in job.error["message"] and job.lease_expires_at is None and job.finished_at is not None
    from sqlalchemy import select

    from shared.tables import WebhookDelivery
    with sessions() as session:
        assert list(session.execute(select(WebhookDelivery.event_type).where(
            WebhookDelivery.job_id == job_id)).scalars()) == ["job.failed"]
    assert run_job(job_id, deps=deps) == "skipped"  # a late duplicate changes nothing


def test_a_job_with_attempts_left_is_taken_over_as_before(deps, sessions, storage, tenant):
    job_id = new_upload_job(sessions, storage, tenant)
    for _ in range(2):
        taken_by_a_worker_that_died(sessions, job_id)
    assert run_job(job_id, deps=deps) == "succeeded"
    assert load(sessions, job_id).attempts == 3


def test_storage_retries_stop_at_the_attempts_cap(deps, sessions, storage, tenant):
    """Object storage down: the job goes back to the queue while attempts remain; the last
    attempt fails it `storage_failed`, however many Celery retries are left."""
    job_id = new_upload_job(sessions, storage, tenant)
    with mock.patch.object(deps.storage, "put", side_effect=StorageFailed("S3 said no")):
        for attempt in (1, 2):
            with pytest.raises(TransientError):
                run_job(job_id, deps=deps, retry_storage=True)
            job = load(sessions, job_id)
            assert (job.status, job.attempts) == ("queued", attempt)
        assert run_job(job_id, deps=deps, retry_storage=True) == "failed"
    job = load(sessions, job_id)
    assert (job.status, job.error["code"], job.attempts) == ("failed", "storage_failed", 3)


@pytest.fixture()
def nan_decoder(deps):
    """The served model's decoder gives NaN (broken or overflowing weights) while the test runs."""
    import torch

    model = deps.segmenter().loaded.model
    weight = model.decoder.transposed_convolution[-1].bias if hasattr(model.decoder, "transposed_convolution") \
        else next(model.decoder.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    yield
    with torch.no_grad():
        weight.copy_(saved)


def test_a_model_that_gives_nan_fails_the_job_as_model_output_invalid(deps, sessions, storage, tenant, nan_decoder):
    job_id = new_upload_job(sessions, storage, tenant)
    assert run_job(job_id, deps=deps) == "failed"  # not a loop of "database unavailable" retries
    job = load(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "model_output_invalid" and job.attempts == 1
    assert "non-finite" in job.error["message"] and job.results == []
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []


def test_a_value_the_database_refuses_fails_the_job_instead_of_retrying(deps, sessions, storage, tenant,
                                                                         nan_decoder):
    """Were non-finite output not caught first, jsonb refuses NaN: a data error is the job's failure
    (`internal`, the service wrote it), never taken for a database outage and retried."""
    job_id = new_upload_job(sessions, storage, tenant)
    with mock.patch("worker.runner._check_finite"):  # the fault: the check is not there
        assert run_job(job_id, deps=deps) == "failed"
    job = load(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "internal" and job.attempts == 1
    assert "could not be recorded" in job.error["message"]


def test_objects_of_a_run_whose_uploads_partly_failed_are_deleted_by_retention(deps, sessions, storage, tenant):
    """The first mask goes up, the second PUT fails: the job fails `storage_failed` and its row names
    no object, but retention still deletes what that run left under the job's prefix."""
    from shared.retention import purge_expired

    job_id = new_upload_job(sessions, storage, tenant)
    real_put = deps.storage.put

    def second_put_fails(key, data, **kwargs):
        if key.endswith("/1.png"):
            raise StorageFailed("S3 went away mid-job")
        real_put(key, data, **kwargs)

    with mock.patch.object(deps.storage, "put", side_effect=second_put_fails):
        assert run_job(job_id, deps=deps) == "failed"
    job = load(sessions, job_id)
    assert job.error["code"] == "storage_failed" and job.results == [] and job.output_keys in ({}, None)
    left = storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/")
    assert left == [mask_key(tenant_id=tenant.tenant_id, job_id=job_id, index=0)]
    with session_scope(sessions) as session:  # old enough for retention
        session.get(Job, job_id).created_at = utcnow() - dt.timedelta(days=60)
    purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=30))
    assert load(sessions, job_id) is None
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/") == []
