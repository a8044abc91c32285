"""Batches end to end: JSON, JSONL and CSV submissions, validation before anything is queued,
the bulk queue, counts, the JSONL manifest, batch.completed exactly once, cancel, isolation."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

import pytest
import redis
import requests
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook

from api import create_app
from shared.batches import finalize
from shared.tables import Batch, Job, WebhookDelivery
from tests.support.images import make_image
from tests.support.webhook_receiver import Receiver


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver().start()
    yield rec
    rec.httpd.shutdown()


def wait_batch(client, tenant, batch_id, status="completed", timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/v1/batches/{batch_id}", headers=tenant.headers).get_json()
        if batch["status"] == status and (batch["results_url"] or status == "running"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def manifest(batch: dict) -> list[dict]:
    resp = requests.get(batch["results_url"], timeout=10)
    assert resp.status_code == 200
    return [json.loads(line) for line in resp.text.splitlines()]


def test_json_batch_completes_once_with_counts_manifest_and_events(wh_client, tenant, receiver, image_server):
    ok = image_server.add(f"/b-{uuid.uuid4().hex[:6]}.jpg", make_image(48, 32))
    path = f"/batch-{uuid.uuid4().hex[:6]}"
    hook = receiver.url(path)
    body = {
        "prompts": ["shirt", "pants"], "metadata": {"catalog": "fall"}, "webhook_url": hook,
        "items": [
            {"image_url": ok, "metadata": {"sku": "1"}},
            {"image_url": image_server.base + "/missing.jpg", "metadata": {"sku": "2"}},
            {"image_url": ok, "prompts": ["dress"], "threshold": 0.6, "metadata": {"sku": "3"}},
        ],
    }
    resp = wh_client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    created = resp.get_json()
    assert resp.headers["Location"] == f"/v1/batches/{created['id']}"
    assert created["status"] == "running" and created["counts"]["total"] == 3 and created["counts"]["queued"] == 3

    batch = wait_batch(wh_client, tenant, created["id"])
    assert batch["counts"] == {"total": 3, "queued": 0, "running": 0, "succeeded": 2, "failed": 1, "canceled": 0}
    assert batch["finished_at"] and batch["metadata"] == {"catalog": "fall"}
    lines = manifest(batch)
    assert [j["metadata"] for j in lines] == [{"catalog": "fall", "sku": s} for s in "123"]  # input order
    assert [j["status"] for j in lines] == ["succeeded", "failed", "succeeded"]
    assert lines[0]["prompts"] == ["shirt", "pants"] and lines[2]["prompts"] == ["dress"]
    assert lines[2]["threshold"] == 0.6 and all(j["batch_id"] == batch["id"] for j in lines)
    mask = requests.get(lines[0]["results"][0]["mask_url"], timeout=10)
    assert mask.status_code == 200 and mask.content.startswith(b"\x89PNG")

    listed = wh_client.get(f"/v1/batches/{batch['id']}/jobs?status=failed", headers=tenant.headers).get_json()
    assert [j["id"] for j in listed["data"]] == [lines[1]["id"]]

    received = receiver.wait(path, 4)  # three job events and batch.completed
    time.sleep(1.0)
    events = [Webhook(tenant.webhook_secret).verify(r.body, r.headers) for r in receiver.at(path)]
    types = sorted(e["type"] for e in events)
    assert types == ["batch.completed", "job.failed", "job.succeeded", "job.succeeded"], types
    completed = next(e for e in events if e["type"] == "batch.completed")
    assert completed["data"]["id"] == batch["id"] and completed["data"]["counts"]["succeeded"] == 2
    assert completed["data"]["results_url"]
    assert len(received) == 4
    rows = wh_client.get(f"/v1/webhook-deliveries?batch_id={batch['id']}", headers=tenant.headers).get_json()["data"]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"succeeded"}


def test_jsonl_and_csv_uploads(wh_client, tenant, image_server):
    ok = image_server.add(f"/b-{uuid.uuid4().hex[:6]}.jpg", make_image(48, 32))
    jsonl = "\n".join(json.dumps({"image_url": ok, "metadata": {"sku": str(i)}}) for i in range(3)) + "\n"
    resp = wh_client.post("/v1/batches", headers=tenant.headers, content_type="multipart/form-data", data={
        "items": (io.BytesIO(jsonl.encode()), "catalog.jsonl", "application/x-ndjson"), "prompts": ["shirt"]})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["counts"]["total"] == 3

    csv_text = f"image_url,prompts,sku,color\n{ok},shirt|pants,A1,red\n{ok},,A2,\n"
    resp = wh_client.post("/v1/batches", headers=tenant.headers, content_type="multipart/form-data", data={
        "items": (io.BytesIO(csv_text.encode()), "catalog.csv", "text/csv"), "prompts": ["dress"],
        "metadata": json.dumps({"catalog": "c1"})})
    assert resp.status_code == 202, resp.get_json()
    batch = wait_batch(wh_client, tenant, resp.get_json()["id"])
    lines = manifest(batch)
    assert [j["prompts"] for j in lines] == [["shirt", "pants"], ["dress"]]
    assert [j["metadata"] for j in lines] == [{"catalog": "c1", "sku": "A1", "color": "red"},
                                              {"catalog": "c1", "sku": "A2"}]
    assert all(j["status"] == "succeeded" for j in lines)


def test_presets_and_outputs_as_batch_defaults_items_and_csv_columns(wh_client, tenant, image_server):
    ok = image_server.add(f"/b-{uuid.uuid4().hex[:6]}.jpg", make_image(48, 32))
    resp = wh_client.post("/v1/batches", headers=tenant.headers, json={
        "preset": "clothing", "outputs": ["mask", "rle"],
        "items": [{"image_url": ok}, {"image_url": ok, "preset": "human_parsing", "outputs": ["label_map"]},
                  {"image_url": ok, "prompts": ["hat"]}]})
    assert resp.status_code == 202, resp.get_json()
    lines = manifest(wait_batch(wh_client, tenant, resp.get_json()["id"]))
    assert [j["status"] for j in lines] == ["succeeded"] * 3
    assert [j["preset"] for j in lines] == ["clothing", "human_parsing", "clothing"]
    assert [j["outputs_requested"] for j in lines] == [["mask", "rle"], ["label_map"], ["mask", "rle"]]
    assert [len(j["results"]) for j in lines] == [3, 17, 4]
    assert lines[2]["results"][3]["prompt"] == "hat" and lines[2]["results"][3]["source"] == "text"
    assert "rle" in lines[0]["results"][0] and "mask_url" in lines[0]["results"][0]
    assert "label_map_url" in lines[1]["outputs"] and "mask_url" not in lines[1]["results"][0]

    csv_text = f"image_url,preset,outputs,prompts\n{ok},clothing,cutout|overlay,\n{ok},,,dress\n"
    resp = wh_client.post("/v1/batches", headers=tenant.headers, content_type="multipart/form-data", data={
        "items": (io.BytesIO(csv_text.encode()), "catalog.csv", "text/csv"), "outputs": ["soft"]})
    assert resp.status_code == 202, resp.get_json()
    lines = manifest(wait_batch(wh_client, tenant, resp.get_json()["id"]))
    assert [(j["preset"], j["outputs_requested"], j["prompts"]) for j in lines] == [
        ("clothing", ["cutout", "overlay"], []), (None, ["soft"], ["dress"])]
    assert "overlay_url" in lines[0]["outputs"] and "soft_url" in lines[1]["results"][0]


@pytest.mark.parametrize(("body", "code", "field"), [
    ({"prompts": ["a"], "items": []}, "invalid_items", "items"),
    ({"prompts": ["a"]}, "invalid_items", "items"),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg"}, {"image_url": "https://x.test/2.jpg"},
                                  {"image_url": "file:///etc/passwd"}]}, "invalid_batch_item", "items[2].image_url"),
    ({"items": [{"image_url": "https://x.test/1.jpg"}]}, "invalid_batch_item", "items[0].prompts"),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg", "color": "red"}]},
     "invalid_batch_item", "items[0].color"),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg", "threshold": 2}]},
     "invalid_batch_item", "items[0].threshold"),
    ({"prompts": ["a"], "items": ["https://x.test/1.jpg"]}, "invalid_batch_item", "items[0]"),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg", "metadata": {"k": 1}}]},
     "invalid_batch_item", "items[0].metadata"),
    ({"prompts": ["a"], "metadata": {f"b{i}": "v" for i in range(10)},  # 10 + 7 pairs: one too many
      "items": [{"image_url": "https://x.test/1.jpg"}, {"image_url": "https://x.test/2.jpg"},
                {"image_url": "https://x.test/3.jpg", "metadata": {f"i{i}": "v" for i in range(7)}}]},
     "invalid_batch_item", "items[2].metadata"),
    ({"prompts": ["a"], "webhook_events": ["batch.exploded"], "items": [{"image_url": "https://x.test/1.jpg"}]},
     "invalid_webhook_events", None),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg"}, {"image_url": "https://x.test/2.jpg",
                                                                          "preset": "nope"}]},
     "invalid_batch_item", "items[1].preset"),
    ({"prompts": ["a"], "items": [{"image_url": "https://x.test/1.jpg", "outputs": ["mask", "svg"]}]},
     "invalid_batch_item", "items[0].outputs"),
    ({"prompts": ["a"], "outputs": ["svg"], "items": [{"image_url": "https://x.test/1.jpg"}]},
     "invalid_outputs", None),
    ({"preset": "human_parsing", "prompts": [f"p{i}" for i in range(16)],
      "items": [{"image_url": "https://x.test/1.jpg"}]}, "invalid_batch_item", "items[0].prompts"),
])
def test_an_invalid_item_fails_the_whole_request_and_nothing_is_queued(client, tenant, sessions, body, code, field):
    resp = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    problem = resp.get_json()
    assert problem["code"] == code, problem
    if field:
        assert problem["errors"][0]["field"] == field
    with sessions() as session:
        assert session.execute(select(func.count()).select_from(Batch).where(
            Batch.tenant_id == tenant.tenant_id)).scalar_one() == 0
        assert session.execute(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant.tenant_id)).scalar_one() == 0


def test_more_than_100000_items_is_refused(client, tenant):
    body = {"prompts": ["a"], "items": [{"image_url": "https://x.test/a.jpg"}] * 100_001}
    resp = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_items"
    assert "100000" in resp.get_json()["detail"]


def test_items_go_to_the_bulk_queue_and_cancel_cancels_what_is_left(settings, tenant, make_tenant, sessions):
    # A bulk queue nobody consumes here, so every job is still queued when we look.
    tag = uuid.uuid4().hex[:6]
    own = settings.model_copy(update={"bulk_queue": f"{settings.bulk_queue}-idle-{tag}",
                                      "interactive_queue": f"{settings.interactive_queue}-idle-{tag}"})
    client = create_app(own).test_client()
    items = [{"image_url": f"https://x.test/{i}.jpg"} for i in range(250)]
    created = client.post("/v1/batches", json={"prompts": ["a"], "items": items}, headers=tenant.headers).get_json()
    broker = redis.Redis.from_url(own.redis_url)
    try:  # the items wait on the bulk lane as rows: the dispatcher sends them as workers free up
        assert broker.llen(own.redis_key_prefix + own.bulk_queue) == 0
        assert broker.llen(own.redis_key_prefix + own.interactive_queue) == 0
    finally:
        broker.close()
    with sessions() as session:
        waiting = session.execute(select(Job.lane, Job.dispatched_at, Job.status)
                                  .where(Job.batch_id == created["id"])).all()
    assert set(waiting) == {(own.bulk_queue, None, "queued")} and len(waiting) == 250

    other = make_tenant()
    for method, path in [("get", ""), ("get", "/jobs"), ("post", "/cancel")]:
        assert getattr(client, method)(f"/v1/batches/{created['id']}{path}", headers=other.headers).status_code == 404
    assert client.get(f"/v1/jobs?batch_id={created['id']}", headers=other.headers).get_json()["data"] == []

    resp = client.post(f"/v1/batches/{created['id']}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    batch = resp.get_json()
    assert batch["status"] == "canceled" and batch["counts"]["canceled"] == 250 and batch["finished_at"]
    assert client.post(f"/v1/batches/{created['id']}/cancel", headers=tenant.headers).status_code == 200
    page = client.get(f"/v1/batches/{created['id']}/jobs?limit=100", headers=tenant.headers).get_json()
    assert len(page["data"]) == 100 and page["next_cursor"] and {j["status"] for j in page["data"]} == {"canceled"}


def test_a_completed_batch_is_not_cancelable(wh_client, tenant, image_server):
    ok = image_server.add(f"/b-{uuid.uuid4().hex[:6]}.jpg", make_image(32, 32))
    created = wh_client.post("/v1/batches", json={"prompts": ["a"], "items": [{"image_url": ok}]},
                             headers=tenant.headers).get_json()
    wait_batch(wh_client, tenant, created["id"])
    resp = wh_client.post(f"/v1/batches/{created['id']}/cancel", headers=tenant.headers)
    assert resp.status_code == 409 and resp.get_json()["code"] == "batch_not_cancelable"


def test_racing_finalizers_complete_a_batch_exactly_once(settings, client, tenant, sessions, storage):
    own = settings.model_copy(update={"bulk_queue": f"{settings.bulk_queue}-race-{uuid.uuid4().hex[:6]}"})
    api = create_app(own).test_client()
    body = {"prompts": ["a"], "webhook_url": "https://hooks.example.com/x",
            "items": [{"image_url": f"https://x.test/{i}.jpg"} for i in range(5)]}
    batch_id = api.post("/v1/batches", json=body, headers=tenant.headers).get_json()["id"]
    with sessions() as session:  # every job finished (as workers would have done)
        session.execute(Job.__table__.update().where(Job.batch_id == batch_id).values(status="failed"))
        session.commit()
    results: list[str | None] = []
    barrier = threading.Barrier(6)

    def race() -> None:
        barrier.wait()
        results.append(finalize(sessions, storage, batch_id))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([r for r in results if r]) == 1
    with sessions() as session:
        assert session.get(Batch, batch_id).status == "completed"
        assert session.execute(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.batch_id == batch_id, WebhookDelivery.event_type == "batch.completed")).scalar_one() == 1
    redis.Redis.from_url(own.redis_url).delete(own.redis_key_prefix + own.bulk_queue)


def test_an_item_that_sets_only_its_image_gets_the_same_job_as_one_that_repeats_the_batchs_fields(
        settings, tenant, sessions):
    # items with only image_url/metadata share the batch's fields, validated once: the job must be the
    # one the full per-item validation makes
    own = settings.model_copy(update={"bulk_queue": f"{settings.bulk_queue}-same-{uuid.uuid4().hex[:6]}"})
    client = create_app(own).test_client()
    defaults = {"prompts": ["shirt"], "preset": "clothing", "outputs": ["mask", "rle"], "threshold": 0.3,
                "refine": "guided", "embed": ["image"]}
    body = {**defaults, "metadata": {"catalog": "c"}, "items": [
        {"image_url": "https://x.test/1.jpg", "metadata": {"sku": "1"}},
        {"image_url": "https://x.test/1.jpg", "metadata": {"sku": "1"}, **{k: v for k, v in defaults.items()}}]}
    created = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert created.status_code == 202, created.get_json()
    jobs = client.get(f"/v1/batches/{created.get_json()['id']}/jobs", headers=tenant.headers).get_json()["data"]
    varying = {"id", "created_at"}
    assert [{k: v for k, v in j.items() if k not in varying} for j in jobs][0] == \
        [{k: v for k, v in j.items() if k not in varying} for j in jobs][1]
    with sessions() as session:
        rows = session.execute(select(Job).where(Job.batch_id == created.get_json()["id"])).scalars().all()
    assert rows[0].labels == rows[1].labels and rows[0].metadata_ == {"catalog": "c", "sku": "1"}
