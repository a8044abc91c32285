"""Crashes and losses, with real processes: every accepted job still ends exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer

import redis

from api import create_app
from shared.models import Job
from tests.conftest import ROOT, settings_env, start_worker, stop_process
from tests.e2e.test_operations import SlowImage


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


def test_worker_killed_mid_job_the_job_still_ends_once(settings, storage, sessions, make_tenant, tmp_path):
    own = own_settings(settings, "kill9")
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


def test_message_lost_by_redis_the_job_still_completes(settings, storage, make_tenant, tmp_path, image_server):
    own = own_settings(settings, "lost")
    tenant = make_tenant()
    client = create_app(own).test_client()
    from tests.conftest import make_image

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
