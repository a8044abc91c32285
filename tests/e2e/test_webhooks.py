"""Webhooks end to end: a real worker (with its embedded beat for retries) posts signed events
to a real receiver on 127.0.0.1; signatures are checked with the standardwebhooks verifier."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from standardwebhooks.webhooks import Webhook

from shared.fetch import FetchPolicy
from shared.webhooks import send
from tests.support.api import wait_for_job
from tests.support.images import make_image
from tests.support.webhook_receiver import Receiver


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver().start()
    yield rec
    rec.httpd.shutdown()




def verify(tenant, request) -> dict:
    """The library's own verifier; raises on a bad signature or a stale timestamp."""
    return Webhook(tenant.webhook_secret).verify(request.body, request.headers)


def deliveries(client, tenant, **query) -> list[dict]:
    resp = client.get("/v1/webhook-deliveries", query_string=query, headers=tenant.headers)
    assert resp.status_code == 200
    return resp.get_json()["data"]


def wait_delivery(client, tenant, job_id, status, timeout=30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = deliveries(client, tenant, job_id=job_id)
        if rows and rows[0]["status"] == status:
            return rows[0]
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def test_failed_first_then_accepted_same_id_and_valid_signatures(wh_client, tenant, receiver, image_server):
    url = image_server.add(f"/wh-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    hook = receiver.url(f"/flaky-{uuid.uuid4().hex[:6]}", 500, 200)
    job_id = wh_client.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt"], "webhook_url": hook,
                                              "metadata": {"sku": "A1"}}, headers=tenant.headers).get_json()["id"]
    assert wait_for_job(wh_client, tenant, job_id)["status"] == "succeeded"
    first, second = receiver.wait(hook.removeprefix(receiver.base), 2)
    for request in (first, second):
        event = verify(tenant, request)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        assert event["data"]["metadata"] == {"sku": "A1"} and len(event["data"]["results"]) == 1
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # stable across retries
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])

    row = wait_delivery(wh_client, tenant, job_id, "succeeded")
    assert row["id"] == first.headers["webhook-id"] and row["attempts"] == 2 and row["last_status_code"] == 200
    assert row["event_type"] == "job.succeeded" and row["next_attempt_at"] is None and row["delivered_at"]
    time.sleep(1.5)
    assert len(receiver.at(hook.removeprefix(receiver.base))) == 2  # delivered means no more sends


def test_event_filter_is_honoured(wh_client, tenant, receiver, image_server):
    url = image_server.add(f"/wh-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    hook = receiver.url(f"/filtered-{uuid.uuid4().hex[:6]}")
    wanted_failed = {"prompts": ["shirt"], "webhook_url": hook, "webhook_events": ["job.failed"]}
    ok = wh_client.post("/v1/jobs", json={"image_url": url, **wanted_failed}, headers=tenant.headers).get_json()
    bad = wh_client.post("/v1/jobs", json={"image_url": image_server.base + "/missing.jpg", **wanted_failed},
                         headers=tenant.headers).get_json()
    assert wait_for_job(wh_client, tenant, ok["id"])["status"] == "succeeded"
    assert wait_for_job(wh_client, tenant, bad["id"])["status"] == "failed"
    (request,) = receiver.wait(hook.removeprefix(receiver.base), 1)
    event = verify(tenant, request)
    assert event["type"] == "job.failed" and event["data"]["id"] == bad["id"]
    assert event["data"]["error"]["code"] == "image_fetch_failed"
    time.sleep(1.0)
    assert len(receiver.at(hook.removeprefix(receiver.base))) == 1
    assert deliveries(wh_client, tenant, job_id=ok["id"]) == []


def test_410_stops_at_once_and_a_manual_retry_resends_the_same_id(wh_client, tenant, make_tenant, receiver,
                                                                  image_server):
    url = image_server.add(f"/wh-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    path = f"/gone-{uuid.uuid4().hex[:6]}"
    hook = receiver.url(path, 410)
    job_id = wh_client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"], "webhook_url": hook},
                            headers=tenant.headers).get_json()["id"]
    row = wait_delivery(wh_client, tenant, job_id, "failed")
    assert row["attempts"] == 1 and row["last_status_code"] == 410 and row["next_attempt_at"] is None
    time.sleep(2.0)  # past the retry delay: nothing more was sent
    assert len(receiver.at(path)) == 1

    other = make_tenant()
    assert wh_client.post(f"/v1/webhook-deliveries/{row['id']}/retry", headers=other.headers).status_code == 404
    assert deliveries(wh_client, other, job_id=job_id) == []

    receiver.scripts[path] = [200]
    resp = wh_client.post(f"/v1/webhook-deliveries/{row['id']}/retry", headers=tenant.headers)
    assert resp.status_code == 202 and resp.get_json()["status"] == "pending"
    again = receiver.wait(path, 2)[1]
    assert again.headers["webhook-id"] == row["id"] and verify(tenant, again)["data"]["id"] == job_id
    assert wait_delivery(wh_client, tenant, job_id, "succeeded")["attempts"] == 2


def test_unanswered_deliveries_follow_the_schedule_then_fail(wh_client, tenant, receiver, image_server):
    url = image_server.add(f"/wh-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    path = f"/down-{uuid.uuid4().hex[:6]}"
    hook = receiver.url(path, 503)
    job_id = wh_client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"], "webhook_url": hook},
                            headers=tenant.headers).get_json()["id"]
    row = wait_delivery(wh_client, tenant, job_id, "failed", timeout=60)
    assert row["attempts"] == 4 and row["last_status_code"] == 503  # 1 + the 3 retries of the schedule
    assert len(receiver.at(path)) == 4
    assert len({r.headers["webhook-id"] for r in receiver.at(path)}) == 1


def test_webhook_urls_obey_the_address_rules(tenant):
    strict = FetchPolicy(allow_private=False, connect_timeout_s=1, read_timeout_s=1, total_timeout_s=2)
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest/", "http://localhost:9/h"):
        outcome = send("msg_x", url, json.dumps({"type": "job.succeeded"}), tenant.webhook_secret, strict, 2)
        assert outcome.status_code is None and outcome.permanent and "non-public" in (outcome.error or "")


def test_job_started_comes_before_the_final_event_when_asked_for(wh_client, tenant, receiver, image_server):
    url = image_server.add(f"/wh-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    hook = receiver.url(f"/started-{uuid.uuid4().hex[:6]}", 200)
    job_id = wh_client.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt"], "webhook_url": hook,
                                              "webhook_events": ["job.succeeded", "job.started"]},
                            headers=tenant.headers).get_json()["id"]
    assert wait_for_job(wh_client, tenant, job_id)["status"] == "succeeded"
    requests_seen = receiver.wait(hook.removeprefix(receiver.base), 2)
    events = [verify(tenant, r) for r in requests_seen]
    assert sorted(e["type"] for e in events) == ["job.started", "job.succeeded"]
    started = next(e for e in events if e["type"] == "job.started")
    assert started["data"]["id"] == job_id and started["data"]["status"] == "running"
    assert started["data"]["attempts"] == 1 and started["data"]["results"] == []
    time.sleep(1.5)
    assert len(receiver.at(hook.removeprefix(receiver.base))) == 2  # nothing more came
