"""What an operator sees and does: metrics (API and worker), Flower, logs, retention, admin CLI,
graceful shutdown. Against the real stack (Postgres, Redis, S3 server, worker processes)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer

import requests
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from shared.clock import utcnow
from shared.db import session_scope
from shared.storage import mask_key, upload_key
from shared.tables import Job
from tests.support.api import wait_for_job
from tests.support.cli import clipmask, lines
from tests.support.images import SlowImage, make_image
from tests.support.services import ROOT, free_port, settings_env, start_worker, stop_process


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)




# ---- metrics ------------------------------------------------------------------------------

def test_api_metrics_count_requests_by_route_and_jobs_by_source(client, tenant, image_server):
    before = samples(client.get("/metrics").get_data(as_text=True))
    url = image_server.add("/metrics-api.jpg", make_image(20, 20))
    job_id = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"]}, headers=tenant.headers).get_json()["id"]
    client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    client.get(f"/v1/jobs/{uuid.uuid4()}", headers=tenant.headers)
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    after = samples(resp.get_data(as_text=True))

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("clipmask_http_requests_total", route="/v1/jobs", method="POST", status="202") == 1
    assert delta("clipmask_http_requests_total", route="/v1/jobs/<job_id>", method="GET", status="200") == 1
    assert delta("clipmask_http_requests_total", route="/v1/jobs/<job_id>", method="GET", status="404") == 1
    assert delta("clipmask_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == 1
    assert delta("clipmask_jobs_created_total", source="url") == 1
    queue_depth = [k for k in after if k[0] == "clipmask_queue_depth"]
    assert queue_depth and dict(queue_depth[0][1])["queue"].startswith("interactive")


def test_worker_metrics_after_jobs(client, tenant, image_server, settings, worker):
    port = settings.worker_metrics_port
    before = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    ok = image_server.add("/metrics-worker.jpg", make_image(40, 30))
    ids = [client.post("/v1/jobs", json={"image_url": ok, "prompts": ["a", "b"]}, headers=tenant.headers)
           .get_json()["id"] for _ in range(2)]
    bad = client.post("/v1/jobs", json={"image_url": image_server.base + "/nope.jpg", "prompts": ["a"]},
                      headers=tenant.headers).get_json()["id"]
    for job_id in [*ids, bad]:
        wait_for_job(client, tenant, job_id)
    after = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # at least: jobs other tests left on the queue may finish in the same window
    assert delta("clipmask_jobs_finished_total", status="succeeded", code="") >= 2
    assert delta("clipmask_jobs_finished_total", status="failed", code="image_fetch_failed") >= 1
    for stage in ("fetch", "decode", "infer", "encode", "upload"):
        assert delta("clipmask_job_stage_seconds_count", stage=stage) >= 2, stage
    assert delta("clipmask_batch_size_count") >= 1
    assert delta("clipmask_job_duration_seconds_count", status="succeeded") >= 2
    assert any(k[0] == "clipmask_gpu_memory_bytes" for k in after) is False  # CPU: no GPU series
    # the engine's JPEG decoder counts are served; on a CPU the job threads decode, so both stay 0
    assert {where: after.get(("clipmask_jpeg_decoded_total", frozenset({("where", where)})))
            for where in ("device", "host")} == {"device": 0.0, "host": 0.0}


# ---- Flower -------------------------------------------------------------------------------

def test_flower_requires_basic_auth_and_sees_the_worker(settings, worker, tmp_path):
    port = free_port()
    env = {**os.environ, **settings_env(settings)}
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", "--address=127.0.0.1",
         f"--port={port}", f"--basic-auth={settings.flower_user}:{settings.flower_password}",
         "--persistent=True", f"--db={tmp_path / 'flower.db'}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                anonymous = requests.get(base + "/", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
                time.sleep(0.3)
        assert anonymous.status_code == 401
        assert requests.get(base + "/", auth=("admin", "wrong"), timeout=5).status_code == 401
        auth = (settings.flower_user, settings.flower_password)
        assert requests.get(base + "/", auth=auth, timeout=5).status_code == 200
        found = False
        while not found and time.monotonic() < deadline + 30:
            workers = requests.get(base + "/api/workers?refresh=1", auth=auth, timeout=10).json()
            found = any(name.startswith("test-") for name in workers)
            time.sleep(0.5)
        assert found
    finally:
        stop_process(proc)
        log.close()


# ---- logs ---------------------------------------------------------------------------------

def test_api_logs_carry_job_and_tenant_ids(client, tenant, image_server, caplog):
    url = image_server.add("/log-api.jpg", make_image(10, 10))
    with caplog.at_level(logging.INFO, logger="api.jobs"):
        job_id = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"]},
                             headers=tenant.headers).get_json()["id"]
    accepted = [r for r in caplog.records if r.getMessage() == "job accepted"]
    assert accepted and accepted[0].job_id == job_id and accepted[0].tenant_id == tenant.tenant_id


# ---- retention ----------------------------------------------------------------------------

def old_job(sessions, storage, tenant, *, days_old: float, status: str) -> tuple[str, list[str]]:
    job_id = str(uuid.uuid4())
    up = upload_key(tenant_id=tenant.tenant_id, job_id=job_id)
    mask = mask_key(tenant_id=tenant.tenant_id, job_id=job_id, index=0)
    storage.put(up, b"img", content_type="image/png")
    storage.put(mask, b"png", content_type="image/png")
    created = utcnow() - dt.timedelta(days=days_old)
    with session_scope(sessions) as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status=status, created_at=created, upload_key=up,
                        input={"upload": {}}, prompts=["a"], threshold=0.4, metadata_={},
                        results=[{"prompt": "a", "mask_key": mask, "bbox": None, "area_fraction": 0, "score": 0}]))
    return job_id, [up, mask]


def test_retention_deletes_old_finished_jobs_and_their_objects(settings, sessions, storage, tenant):
    old = [old_job(sessions, storage, tenant, days_old=40, status=s) for s in ("succeeded", "failed", "canceled")]
    stuck = old_job(sessions, storage, tenant, days_old=40, status="queued")
    recent = old_job(sessions, storage, tenant, days_old=2, status="succeeded")
    out = lines(clipmask(settings.model_copy(update={"retention_chunk": 2}), "retention", "--days", "30"))
    assert out[0]["deleted_jobs"] >= 3
    with sessions() as session:
        for job_id, keys in old:
            assert session.get(Job, job_id) is None
            assert not storage.list_keys(keys[0]) and not storage.list_keys(keys[1])
        for job_id, keys in (stuck, recent):
            assert session.get(Job, job_id) is not None
            assert storage.list_keys(keys[1]) == [keys[1]]


def test_retention_works_in_bounded_chunks(settings, sessions, storage, tenant):
    from shared.retention import purge_expired

    for _ in range(3):
        old_job(sessions, storage, tenant, days_old=100, status="succeeded")
    assert purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=90), chunk=2,
                         max_chunks=1).jobs == 2
    assert purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=90), chunk=2).jobs >= 1


# ---- admin CLI ----------------------------------------------------------------------------

def test_admin_jobs_list_and_retry(settings, client, tenant, image_server, worker):
    path = f"/flaky-{uuid.uuid4().hex[:6]}.jpg"
    job_id = client.post("/v1/jobs", json={"image_url": image_server.base + path, "prompts": ["a"]},
                         headers=tenant.headers).get_json()["id"]
    assert wait_for_job(client, tenant, job_id)["status"] == "failed"
    listed = lines(clipmask(settings, "jobs", "list", "--status", "failed", "--tenant", tenant.tenant_id))
    assert [j["id"] for j in listed] == [job_id] and listed[0]["error"]["code"] == "image_fetch_failed"

    image_server.add(path, make_image(20, 20))  # the image is there now
    retried = lines(clipmask(settings, "jobs", "retry", job_id))
    assert retried[0]["retried"] == job_id
    new = wait_for_job(client, tenant, retried[0]["new_job_id"])
    assert new["status"] == "succeeded" and new["input"] == {"image_url": image_server.base + path}
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "failed"
    assert clipmask(settings, "jobs", "retry", retried[0]["new_job_id"]).returncode == 1  # not failed


def test_admin_retry_copies_an_upload(settings, client, tenant, worker, sessions):
    job_id = str(uuid.uuid4())
    with session_scope(sessions) as session:  # a failed upload job whose upload is still stored
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status="failed", input={"upload": {}},
                        upload_key=None, prompts=["a"], threshold=0.4, metadata_={"sku": "1"}, results=[],
                        error={"code": "internal", "message": "boom"}))
    from shared.storage import ObjectStorage

    store = ObjectStorage(settings)
    key = upload_key(tenant_id=tenant.tenant_id, job_id=job_id)
    store.put(key, make_image(16, 16, fmt="PNG"), content_type="image/png")
    with session_scope(sessions) as session:
        session.get(Job, job_id).upload_key = key
    new_id = lines(clipmask(settings, "jobs", "retry", "--failed", "--tenant", tenant.tenant_id))[0]["new_job_id"]
    new = wait_for_job(client, tenant, new_id)
    assert new["status"] == "succeeded" and new["metadata"] == {"sku": "1"} and new["image"]["width"] == 16


def test_admin_retry_keeps_every_field_of_the_request(settings, client, tenant, image_server, worker, sessions):
    """Retries are built from the stored job by the code that builds jobs (JobSpec.again), so image
    prompts, embed, preset, outputs and webhooks come along (a hand-built retry dropped some)."""
    import base64

    path = f"/later-{uuid.uuid4().hex[:6]}.jpg"
    example = image_server.add(f"/ex-{uuid.uuid4().hex[:6]}.png", make_image(40, 40, fmt="PNG"),
                               content_type="image/png")
    body = {"image_url": image_server.base + path, "preset": "clothing", "prompts": ["a red scarf"],
            "image_prompts": [{"label": "gown", "image_url": example},
                              {"label": "print", "image_base64": base64.b64encode(make_image(30, 30)).decode()}],
            "embed": ["image", "masks"], "outputs": ["mask", "soft", "rle"], "threshold": 0.35,
            "metadata": {"sku": "42"}, "webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["job.failed"]}
    job_id = client.post("/v1/jobs", json=body, headers=tenant.headers).get_json()["id"]
    assert wait_for_job(client, tenant, job_id)["status"] == "failed"
    image_server.add(path, make_image(48, 32))
    new_id = lines(clipmask(settings, "jobs", "retry", job_id))[0]["new_job_id"]
    new = wait_for_job(client, tenant, new_id)
    assert new["status"] == "succeeded", new
    with sessions() as session:
        old_row, new_row = session.get(Job, job_id), session.get(Job, new_id)
        fields = ("input", "prompts", "threshold", "labels", "preset", "outputs_requested", "image_prompts", "embed",
                  "metadata_", "webhook_url", "webhook_events", "upload_key")
        assert {f: getattr(new_row, f) for f in fields} == {f: getattr(old_row, f) for f in fields}
    assert len(new["embedding"]) > 0 and [r["source"] for r in new["results"]] == (
        ["preset"] * 3 + ["text", "image", "image"])
    assert all("rle" in r and "soft_url" in r for r in new["results"])


def test_admin_tenant_and_key_commands(settings, client, make_tenant):
    tenant = make_tenant()
    assert tenant.tenant_id in {t["tenant_id"] for t in lines(clipmask(settings, "tenant", "list"))}

    second = lines(clipmask(settings, "key", "create", tenant.tenant_id))[0]["api_key"]
    lines(clipmask(settings, "key", "revoke", tenant.api_key))
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert clipmask(settings, "key", "revoke", tenant.api_key).returncode == 1  # already revoked

    lines(clipmask(settings, "tenant", "disable", tenant.tenant_id))
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {second}"}).status_code == 401


# ---- graceful shutdown --------------------------------------------------------------------



def test_worker_asked_to_stop_finishes_its_job_first(settings, storage, make_tenant, tmp_path):
    own = settings.model_copy(update={"interactive_queue": f"{settings.interactive_queue}-shutdown",
                                      "worker_metrics_port": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = start_worker(own, tmp_path / "worker.log", name=f"shutdown-{uuid.uuid4().hex[:6]}")
    tenant = make_tenant()
    client = create_app(own).test_client()
    try:
        job_id = client.post("/v1/jobs", json={"image_url": f"http://127.0.0.1:{server.server_address[1]}/s.jpg",
                                               "prompts": ["a"]}, headers=tenant.headers).get_json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stop_process(proc, timeout=60) == 0  # warm shutdown: waits for the running task
        assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "succeeded"
    finally:
        if proc.poll() is None:
            stop_process(proc)
        server.shutdown()


def test_admin_retry_of_a_batch_job_is_a_single_job_the_batch_stays_final(settings, client, tenant, image_server,
                                                                          worker):
    ok = image_server.add(f"/ok-{uuid.uuid4().hex[:6]}.jpg", make_image(20, 20))
    batch = client.post("/v1/batches", json={"prompts": ["a"], "items": [
        {"image_url": ok}, {"image_url": image_server.base + "/missing.jpg"}]}, headers=tenant.headers).get_json()
    deadline = time.monotonic() + 60
    while (done := client.get(f"/v1/batches/{batch['id']}", headers=tenant.headers).get_json())["status"] != \
            "completed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done["counts"] == {"total": 2, "queued": 0, "running": 0, "succeeded": 1, "failed": 1, "canceled": 0}
    failed = client.get(f"/v1/batches/{batch['id']}/jobs?status=failed", headers=tenant.headers).get_json()["data"]

    retried = lines(clipmask(settings, "jobs", "retry", failed[0]["id"]))
    new = client.get(f"/v1/jobs/{retried[0]['new_job_id']}", headers=tenant.headers).get_json()
    assert new["batch_id"] is None and new["input"] == failed[0]["input"]
    assert client.get(f"/v1/batches/{batch['id']}", headers=tenant.headers).get_json()["counts"] == done["counts"]
    wait_for_job(client, tenant, new["id"])


def test_admin_retry_obeys_the_queued_jobs_cap(settings, client, tenant, sessions):
    job_id = str(uuid.uuid4())
    with session_scope(sessions) as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status="failed", input={"image_url": "http://x/y"},
                        prompts=["a"], threshold=0.4, metadata_={}, results=[],
                        error={"code": "internal", "message": "boom"}))
    lines(clipmask(settings, "tenant", "limits", tenant.tenant_id, "--max-queued", "0"))
    out = clipmask(settings, "jobs", "retry", job_id)
    assert out.returncode == 1
    assert json.loads(out.stdout)["refused"] == "too_many_queued_jobs"


def test_retention_takes_old_batches_manifests_and_deliveries_after_their_jobs(settings, sessions, storage, tenant):
    from shared.batches import manifest_key
    from shared.tables import Batch, WebhookDelivery
    from shared.webhooks import new_delivery

    created = utcnow() - dt.timedelta(days=40)

    def batch(status: str, job_status: str, *, days_old: float = 40) -> tuple[str, str, str]:
        batch_id, job_id = f"batch_{uuid.uuid4().hex}", str(uuid.uuid4())
        when = utcnow() - dt.timedelta(days=days_old)
        key = manifest_key(tenant_id=tenant.tenant_id, batch_id=batch_id)
        storage.put(key, b"{}\n", content_type="application/x-ndjson")
        with session_scope(sessions) as session:
            session.add(Batch(id=batch_id, tenant_id=tenant.tenant_id, status=status, created_at=when, total=1,
                              metadata_={}, results_key=key))
            session.flush()
            session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status=job_status, created_at=when,
                            input={"image_url": "https://x.test/a.jpg"}, prompts=["a"], threshold=0.4,
                            metadata_={}, results=[], batch_id=batch_id))
        return batch_id, job_id, key

    done = batch("completed", "succeeded")
    canceled = batch("canceled", "canceled")
    unfinished = batch("running", "queued")  # a job still waits: neither it nor its batch goes
    recent = batch("completed", "succeeded", days_old=2)
    with session_scope(sessions) as session:
        deliveries = {}
        for name, status in (("sent", "succeeded"), ("gave_up", "failed"), ("retrying", "pending")):
            row = new_delivery(tenant_id=tenant.tenant_id, event_type="job.succeeded", url="https://h.test/",
                               data={}, job_id=done[1], batch_id=done[0])
            row.status, row.created_at = status, created
            session.add(row)
            deliveries[name] = row.id

    out = lines(clipmask(settings.model_copy(update={"retention_chunk": 1}), "retention", "--days", "30"))[0]
    assert out["deleted_batches"] >= 2 and out["deleted_webhook_deliveries"] >= 2
    with sessions() as session:
        for batch_id, job_id, key in (done, canceled):
            assert session.get(Batch, batch_id) is None and session.get(Job, job_id) is None
            assert storage.list_keys(key) == []
        for batch_id, _job_id, key in (unfinished, recent):
            assert session.get(Batch, batch_id) is not None and storage.list_keys(key) == [key]
        assert session.get(Job, unfinished[1]) is not None
        assert session.get(WebhookDelivery, deliveries["sent"]) is None
        assert session.get(WebhookDelivery, deliveries["gave_up"]) is None
        assert session.get(WebhookDelivery, deliveries["retrying"]) is not None  # still being retried
