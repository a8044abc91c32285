"""Crashes and losses, with real processes: every accepted job still ends exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from api import create_app
from shared.db import make_engine, make_session_factory
from shared.tables import Job
from tests.support.api import wait_for_job
from tests.support.images import SlowImage
from tests.support.services import ROOT, migrated_database, settings_env, start_worker, stop_process


@pytest.fixture(scope="module")
def fault_database():
    with migrated_database(f"clipmask_faults_{uuid.uuid4().hex[:10]}") as url:
        yield url


# This module's reconciler runs look at every queued job in the database: a database of its own,
# so that other tests' jobs (queued for queues nobody serves) are not swept into these queues.
@pytest.fixture(scope="module")
def fault_settings(settings, fault_database):
    return settings.model_copy(update={"database_url": fault_database})


@pytest.fixture(scope="module")
def sessions(fault_database):
    return make_session_factory(make_engine(fault_database, pool_size=2))


def reconcile_until_finished(settings, client, tenant, job_id, *, timeout=60) -> dict:
    """Run the reconciler (as beat would) until the job has ended."""
    env = {**os.environ, **settings_env(settings)}
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
        if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            return job
        subprocess.run([sys.executable, "-m", "cli.main", "reconcile", "--queued-after", "1"], cwd=ROOT, env=env,
                       capture_output=True, timeout=60, check=True)
        time.sleep(0.5)


def own_settings(settings, name):
    return settings.model_copy(update={"interactive_queue": f"{settings.interactive_queue}-{name}",
                                       "worker_metrics_port": 0, "job_lease_s": 2.0})


def test_worker_killed_mid_job_the_job_still_ends_once(fault_settings, storage, sessions, make_tenant, tmp_path):
    own = own_settings(fault_settings, "kill9")
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tenant = make_tenant()
    client = create_app(own).test_client()
    first = start_worker(own, tmp_path / "a.log", name=f"doomed-{uuid.uuid4().hex[:6]}")
    second = None
    try:
        job_id = client.post("/v1/jobs", json={"image_url": f"http://127.0.0.1:{server.server_address[1]}/s.jpg",
                                               "prompts": ["shirt", "pants"]}, headers=tenant.headers).get_json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # no warm shutdown, no ack, no final write
        first.wait()
        assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "running"

        second = start_worker(own, tmp_path / "b.log", name=f"rescuer-{uuid.uuid4().hex[:6]}")
        job = reconcile_until_finished(own, client, tenant, job_id)
        assert job["status"] == "succeeded"
        assert [r["prompt"] for r in job["results"]] == ["shirt", "pants"]
        with sessions() as session:
            assert session.get(Job, job_id).attempts == 2
        assert len(storage.list_keys(f"masks/{tenant.tenant_id}/{job_id}/")) == 2  # one set, no extras
    finally:
        if second is not None:
            stop_process(second)
        server.shutdown()


def test_message_lost_by_redis_the_job_still_completes(fault_settings, storage, make_tenant, tmp_path, image_server):
    own = own_settings(fault_settings, "lost")
    tenant = make_tenant()
    client = create_app(own).test_client()
    from tests.support.images import make_image

    url = image_server.add(f"/lost-{uuid.uuid4().hex[:6]}.jpg", make_image(30, 30))
    job_id = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"]}, headers=tenant.headers).get_json()["id"]
    # Redis loses the queue (FLUSHALL, a restart without persistence) before any worker took it.
    broker = redis.Redis.from_url(own.redis_url)
    assert broker.delete(own.redis_key_prefix + own.interactive_queue) == 1
    broker.close()
    worker = start_worker(own, tmp_path / "w.log", name=f"after-flush-{uuid.uuid4().hex[:6]}")
    try:
        time.sleep(1.2)  # let the job be "queued too long" for --queued-after 1
        job = reconcile_until_finished(own, client, tenant, job_id)
        assert job["status"] == "succeeded" and len(job["results"]) == 1
    finally:
        stop_process(worker)


def test_worker_killed_mid_batch_every_job_ends_once_with_one_event_each(fault_settings, storage, sessions, make_tenant,
                                                                        tmp_path):
    from sqlalchemy import func, select

    from shared.tables import Batch, WebhookDelivery
    from tests.support.webhook_receiver import Receiver

    own = own_settings(fault_settings, "kill9batch")
    own = own.model_copy(update={"bulk_queue": f"{fault_settings.bulk_queue}-kill9", "events_queue":
                                 f"{fault_settings.events_queue}-kill9"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver = Receiver().start()
    tenant = make_tenant()
    client = create_app(own).test_client()
    first = start_worker(own, tmp_path / "a.log", name=f"doomed-{uuid.uuid4().hex[:6]}")
    second = None
    items = [{"image_url": f"http://127.0.0.1:{server.server_address[1]}/s{i}.jpg"} for i in range(6)]
    try:
        batch_id = client.post("/v1/batches", json={"items": items, "prompts": ["shirt", "pants"],
                                                    "webhook_url": receiver.url("/events")},
                               headers=tenant.headers).get_json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/batches/{batch_id}", headers=tenant.headers).get_json()["counts"]["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

        second = start_worker(own, tmp_path / "b.log", name=f"rescuer-{uuid.uuid4().hex[:6]}")
        env = {**os.environ, **settings_env(own)}
        deadline = time.monotonic() + 120
        while True:
            batch = client.get(f"/v1/batches/{batch_id}", headers=tenant.headers).get_json()
            if batch["status"] == "completed" and batch["results_url"]:
                break
            assert time.monotonic() < deadline, batch
            subprocess.run([sys.executable, "-m", "cli.main", "reconcile", "--queued-after", "5"], cwd=ROOT, env=env,
                           capture_output=True, timeout=60, check=True)
            time.sleep(1)
        assert batch["counts"]["succeeded"] == 6
        with sessions() as session:
            jobs = session.execute(select(Job).where(Job.batch_id == batch_id)).scalars().all()
            assert max(j.attempts for j in jobs) >= 2  # some job was taken over from the dead worker
            rows = session.execute(select(WebhookDelivery.job_id, WebhookDelivery.event_type).where(
                WebhookDelivery.batch_id == batch_id)).all()
            assert session.get(Batch, batch_id).status == "completed"
            assert session.execute(select(func.count()).select_from(Batch).where(Batch.id == batch_id)).scalar() == 1
        assert sorted(r.event_type for r in rows) == ["batch.completed"] + ["job.succeeded"] * 6
        assert len({r.job_id for r in rows if r.job_id}) == 6  # one event per job
        for job in jobs:
            assert len(storage.list_keys(f"masks/{tenant.tenant_id}/{job.id}/")) == 2
        received = receiver.wait("/events", 7, timeout=60)
        assert len({r.headers["webhook-id"] for r in received}) == 7
    finally:
        if second is not None:
            stop_process(second)
        server.shutdown()
        receiver.httpd.shutdown()


class HangingImage(BaseHTTPRequestHandler):
    """An image server that never answers: the job sits in its fetch until its worker is killed."""

    def do_GET(self) -> None:
        time.sleep(120)

    def log_message(self, *args) -> None:
        pass


def test_a_job_that_kills_its_worker_each_time_ends_attempts_exhausted(fault_settings, sessions, make_tenant,
                                                                       tmp_path, image_server):
    """kill -9 the worker under one job three times: the job ends failed `attempts_exhausted`, its
    attempts never above 3, and the other jobs run on that worker meanwhile all succeed."""
    from tests.support.images import make_image

    own = own_settings(fault_settings, "poison")
    assert own.job_max_attempts == 3
    server = ThreadingHTTPServer(("127.0.0.1", 0), HangingImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tenant = make_tenant()
    client = create_app(own).test_client()
    env = {**os.environ, **settings_env(own)}
    good_url = image_server.add(f"/fine-{uuid.uuid4().hex[:6]}.jpg", make_image(30, 30))

    def attempts(job_id: str) -> int:
        with sessions() as session:
            return session.get(Job, job_id, populate_existing=True).attempts

    poison = client.post("/v1/jobs", json={"image_url": f"http://127.0.0.1:{server.server_address[1]}/p.jpg",
                                           "prompts": ["shirt"]}, headers=tenant.headers).get_json()["id"]
    good: list[str] = []
    worker = None
    try:
        for attempt in (1, 2, 3):
            worker = start_worker(own, tmp_path / f"w{attempt}.log", name=f"poisoned-{attempt}-{uuid.uuid4().hex[:6]}")
            deadline = time.monotonic() + 60
            while attempts(poison) < attempt:  # taken again (after the reconciler requeued it)
                assert time.monotonic() < deadline, f"attempt {attempt} never started"
                subprocess.run([sys.executable, "-m", "cli.main", "reconcile", "--queued-after", "1"], cwd=ROOT,
                               env=env, capture_output=True, timeout=60, check=True)
                time.sleep(0.5)
            ids = [client.post("/v1/jobs", json={"image_url": good_url, "prompts": ["a"]},
                               headers=tenant.headers).get_json()["id"] for _ in range(2)]
            for job_id in ids:  # the same worker runs other jobs beside the one that will kill it
                assert wait_for_job(client, tenant, job_id, timeout=60)["status"] == "succeeded"
            good += ids
            os.killpg(worker.pid, signal.SIGKILL)  # out of memory, say: no ack, no final write
            worker.wait()
            time.sleep(own.job_lease_s + 0.5)  # its lease runs out

        worker = start_worker(own, tmp_path / "w4.log", name=f"after-{uuid.uuid4().hex[:6]}")
        job = reconcile_until_finished(own, client, tenant, poison)
        assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted", job
        assert attempts(poison) == 3
        for job_id in good:
            job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
            assert job["status"] == "succeeded" and attempts(job_id) == 1
    finally:
        if worker is not None and worker.poll() is None:
            stop_process(worker)
        server.shutdown()
