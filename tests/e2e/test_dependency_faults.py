"""Dependencies that go away, with real process stops: an S3-protocol server and the network
path to Postgres are killed and started again while a real worker process runs jobs."""

from __future__ import annotations

import base64
import time
import uuid

import requests
from sqlalchemy import select

from api import create_app
from cli.dev_s3 import volumes_known, volumes_on_disk
from shared.storage import ObjectStorage
from shared.tables import Job
from tests.support.api import wait_for_job
from tests.support.faults import kill, s3_ports, start_postgres_proxy, start_s3_server
from tests.support.images import make_image
from tests.support.services import free_port, pg_address, start_worker, stop_process


def attempts(sessions, job_id: str) -> int:
    with sessions() as session:
        return session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()


def test_storage_down_jobs_retry_then_fail_and_recover_when_it_is_back(
        settings, sessions, make_tenant, image_server, tmp_path):
    ports, data = s3_ports(), tmp_path / "s3"
    own = settings.model_copy(update={
        "s3_endpoint_url": f"http://127.0.0.1:{ports.s3}", "s3_bucket": f"fault-{uuid.uuid4().hex[:8]}",
        "interactive_queue": f"{settings.interactive_queue}-s3down", "worker_metrics_port": 0,
        # backoff 2, 4, 8, 16 s: a PUT to a dead server fails within a second, and the gaps after the
        # second attempt must outlast restarting the S3 server below (SeaweedFS takes 3-15 s here)
        "job_max_retries": 4, "job_retry_backoff_s": 2.0, "s3_connect_timeout_s": 1.0,
        "job_max_attempts": 5,  # storage retries count as attempts: room for all four retries
    })
    tenant = make_tenant()
    client = create_app(own).test_client()
    url = image_server.add(f"/s3down-{uuid.uuid4().hex[:6]}.jpg", make_image(64, 48))
    body = {"image_url": url, "prompts": ["shirt", "pants"]}

    s3 = start_s3_server(ports, data)
    ObjectStorage(own).ensure_bucket()
    worker = start_worker(own, tmp_path / "worker.log", name=f"s3down-{uuid.uuid4().hex[:6]}")
    try:
        before = client.post("/v1/jobs", json=body, headers=tenant.headers).get_json()["id"]
        done = wait_for_job(client, tenant, before, timeout=60)
        assert done["status"] == "succeeded", done
        masks_before = [requests.get(r["mask_url"], timeout=10).content for r in done["results"]]
        kill(s3)  # the S3 server dies (SIGKILL)
        # An upload needs storage at once: 503 with Retry-After, nothing accepted.
        resp = client.post("/v1/jobs", json={"image_base64": base64.b64encode(make_image()).decode(),
                                             "prompts": ["a"]}, headers=tenant.headers)
        assert resp.status_code == 503 and resp.headers["Retry-After"]
        assert resp.get_json()["code"] == "dependency_unavailable"

        # A URL job is accepted; its masks cannot be written: retries with backoff, then failed.
        doomed = client.post("/v1/jobs", json=body, headers=tenant.headers).get_json()["id"]
        job = wait_for_job(client, tenant, doomed, timeout=90)
        assert job["status"] == "failed" and job["error"]["code"] == "storage_failed"
        assert job["results"] == []
        assert attempts(sessions, doomed) == 1 + own.job_max_retries

        # Storage comes back while a job is between retries: that job succeeds, masks in place.
        rescued = client.post("/v1/jobs", json=body, headers=tenant.headers).get_json()["id"]
        deadline = time.monotonic() + 30
        while attempts(sessions, rescued) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s3 = start_s3_server(ports, data)  # the same server again: its folder kept the objects and the bucket
        job = wait_for_job(client, tenant, rescued, timeout=60)
        assert job["status"] == "succeeded", job
        for result in job["results"]:
            mask = requests.get(result["mask_url"], timeout=10)
            assert mask.status_code == 200 and mask.content.startswith(b"\x89PNG")
        assert job["results"][0]["mask_url"] != job["results"][1]["mask_url"]
        # what was written before the outage is still there, byte for byte
        again = client.get(f"/v1/jobs/{before}", headers=tenant.headers).get_json()
        assert [requests.get(r["mask_url"], timeout=10).content for r in again["results"]] == masks_before
    finally:
        stop_process(worker)
        kill(s3)


def test_a_restarted_s3_server_serves_every_kept_object_as_soon_as_it_is_ready(settings, tmp_path):
    """SeaweedFS killed and started again on its folder: once `start` returns (what `make up` and
    `clipmask dev-s3 --wait` wait for), every object written before reads back at once. ListBuckets
    alone answers before the volume server's heartbeat tells the master where the old volumes are,
    and a GET then is a 500 InternalError (a CI run saw it)."""
    ports, data = s3_ports(), tmp_path / "s3"
    own = settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{ports.s3}",
                                      "s3_bucket": f"restart-{uuid.uuid4().hex[:8]}"})
    s3 = start_s3_server(ports, data)
    try:
        storage = ObjectStorage(own)
        storage.ensure_bucket()
        kept = {f"kept/{index}.bin": uuid.uuid4().bytes * (index + 1) for index in range(6)}
        for key, body in kept.items():
            storage.put(key, body, content_type="application/octet-stream")
        kill(s3)
        assert volumes_on_disk(data) > 0
        s3 = start_s3_server(ports, data)
        assert volumes_known(ports.master) >= volumes_on_disk(data)
        # as a client reads a mask: one GET of its presigned URL, no SDK retrying a 500
        fresh = ObjectStorage(own)
        assert {key: requests.get(fresh.presign_get(key), timeout=10).content for key in kept} == kept
    finally:
        kill(s3)


def test_postgres_unreachable_api_answers_503_and_workers_resume(
        settings, database_url, sessions, make_tenant, image_server, tmp_path):
    port = free_port()
    via_proxy = database_url.replace(pg_address(), f"127.0.0.1:{port}")
    own = settings.model_copy(update={
        "database_url": via_proxy, "interactive_queue": f"{settings.interactive_queue}-pgdown",
        "worker_metrics_port": 0, "job_max_retries": 8, "job_retry_backoff_s": 0.5,
    })
    tenant = make_tenant()
    direct = create_app(own.model_copy(update={"database_url": database_url})).test_client()
    proxied = create_app(own).test_client()
    url = image_server.add(f"/pgdown-{uuid.uuid4().hex[:6]}.jpg", make_image(64, 48))

    proxy = start_postgres_proxy(port)
    worker = start_worker(own, tmp_path / "worker.log", name=f"pgdown-{uuid.uuid4().hex[:6]}")
    try:
        assert proxied.get("/v1/jobs", headers=tenant.headers).status_code == 200
        kill(proxy)  # Postgres unreachable for the API and the worker

        for method, path, kwargs in [
            ("get", "/v1/jobs", {}),
            ("post", "/v1/jobs", {"json": {"image_url": url, "prompts": ["a"]}}),
            ("get", f"/v1/jobs/{uuid.uuid4()}", {}),
        ]:
            resp = getattr(proxied, method)(path, headers=tenant.headers, **kwargs)
            assert resp.status_code == 503, (path, resp.status_code, resp.get_data()[:300])
            assert resp.mimetype == "application/problem+json"
            assert resp.get_json()["code"] == "dependency_unavailable" and int(resp.headers["Retry-After"]) > 0
        assert proxied.get("/readyz").status_code == 503

        # A job accepted through a path that still reaches Postgres waits for the worker's.
        job_id = direct.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt"]},
                             headers=tenant.headers).get_json()["id"]
        time.sleep(3)  # the worker takes the message and retries with backoff meanwhile
        assert direct.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "queued"

        proxy = start_postgres_proxy(port)
        job = wait_for_job(direct, tenant, job_id, timeout=60)
        assert job["status"] == "succeeded" and len(job["results"]) == 1
        assert proxied.get(f"/v1/jobs/{job_id}", headers=tenant.headers).status_code == 200
    finally:
        stop_process(worker)
        kill(proxy)
