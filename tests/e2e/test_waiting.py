"""`Prefer: wait` on POST /v1/jobs and GET /v1/jobs/{id}: real Postgres NOTIFY, a real worker."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from werkzeug.datastructures import Headers

from api import create_app
from api.waiting import preferred_wait
from tests.support.images import make_image
from tests.support.services import private_queues


@pytest.fixture(scope="module")
def idle_client(settings, storage):
    """An API whose queues no worker serves: its jobs stay queued until canceled."""
    return create_app(private_queues(settings, f"idle-{uuid.uuid4().hex[:6]}")).test_client()


def queued_job(client, tenant) -> str:
    resp = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["shirt"]},
                       headers=tenant.headers)
    assert resp.status_code == 202
    return resp.get_json()["id"]


@pytest.mark.unit
@pytest.mark.parametrize(("values", "seconds"), [
    (["wait"], 60), (["wait=5"], 5), (["wait=600"], 60), (['wait="7"'], 7), (["respond-async, wait=3"], 3),
    (["handling=lenient", "wait=2"], 2), (["wait = 4"], 4), (["WAIT=9"], 9), (["wait=10; foo=bar"], 10),
    ([], None), (["wait=0"], None), (["wait=-1"], None), (["wait=abc"], None), (["waiting=3"], None),
    (["wait=1.5"], None), (["respond-async"], None),
])
def test_prefer_wait_is_read_as_rfc_7240_says(values, seconds):
    assert preferred_wait(Headers([("Prefer", v) for v in values])) == seconds


@pytest.mark.usefixtures("worker")
def test_post_waits_and_answers_201_with_the_final_job(client, tenant, image_server):
    url = image_server.add(f"/wait-{uuid.uuid4().hex[:6]}.jpg", make_image(64, 48))
    resp = client.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt"]},
                       headers={**tenant.headers, "Prefer": "wait=30"})
    assert resp.status_code == 201, resp.get_json()
    job = resp.get_json()
    assert job["status"] == "succeeded" and len(job["results"]) == 1 and job["results"][0]["mask_url"]
    assert resp.headers["Preference-Applied"] == "wait=30" and "Prefer" in resp.headers["Vary"]
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"


@pytest.mark.usefixtures("worker")
def test_a_replay_of_a_waited_create_answers_what_was_answered(client, tenant, image_server):
    """201 with the final job first: the key's replay is 201 with the same final job, not the 202
    queued job stored when it was created."""
    url = image_server.add(f"/wait-{uuid.uuid4().hex[:6]}.jpg", make_image(64, 48))
    headers = {**tenant.headers, "Prefer": "wait=30", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    body = {"image_url": url, "prompts": ["shirt"]}
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201, first.get_json()
    replay = client.post("/v1/jobs", json=body, headers=headers)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Location"] == first.headers["Location"]
    again, answered = replay.get_json(), first.get_json()
    assert again["id"] == answered["id"] and again["status"] == "succeeded"
    assert [r["bbox"] for r in again["results"]] == [r["bbox"] for r in answered["results"]]


def test_a_replay_of_a_create_that_timed_out_waiting_is_202(idle_client, tenant):
    headers = {**tenant.headers, "Prefer": "wait=1", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    body = {"image_url": "https://example.com/a.jpg", "prompts": ["shirt"]}
    first = idle_client.post("/v1/jobs", json=body, headers=headers)
    replay = idle_client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == replay.status_code == 202 and replay.get_json()["id"] == first.get_json()["id"]


def test_post_answers_202_when_the_job_is_not_done_within_the_wait(idle_client, tenant):
    start = time.monotonic()
    resp = idle_client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["shirt"]},
                            headers={**tenant.headers, "Prefer": "wait=1"})
    elapsed = time.monotonic() - start
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    assert resp.headers["Preference-Applied"] == "wait=1"
    assert 0.9 <= elapsed < 4


def test_get_wakes_on_the_notification_not_the_deadline(idle_client, tenant):
    job_id = queued_job(idle_client, tenant)
    canceler = threading.Timer(0.5, lambda: idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers))
    start = time.monotonic()
    canceler.start()
    resp = idle_client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": "wait=30"})
    elapsed = time.monotonic() - start
    assert resp.status_code == 200 and resp.get_json()["status"] == "canceled"
    assert resp.headers["Preference-Applied"] == "wait=30"
    assert elapsed < 5  # woken by NOTIFY, 25 s before the deadline


def test_a_batch_cancel_wakes_every_waiter(idle_client, tenant):
    resp = idle_client.post("/v1/batches", json={"prompts": ["a"], "items": [
        {"image_url": f"https://example.com/{i}.jpg"} for i in range(3)]}, headers=tenant.headers)
    batch_id = resp.get_json()["id"]
    jobs = idle_client.get(f"/v1/batches/{batch_id}/jobs", headers=tenant.headers).get_json()["data"]
    answers: dict[str, str] = {}

    def wait(job_id: str) -> None:
        got = idle_client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": "wait=30"})
        answers[job_id] = got.get_json()["status"]

    threads = [threading.Thread(target=wait, args=(job["id"],)) for job in jobs]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert idle_client.post(f"/v1/batches/{batch_id}/cancel", headers=tenant.headers).status_code == 200
    for t in threads:
        t.join(timeout=30)
    assert answers == {job["id"]: "canceled" for job in jobs} and time.monotonic() - start < 5


def test_a_finished_job_answers_at_once_and_malformed_preferences_are_ignored(idle_client, tenant):
    job_id = queued_job(idle_client, tenant)
    idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    start = time.monotonic()
    resp = idle_client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": "wait=600"})
    assert resp.status_code == 200 and resp.headers["Preference-Applied"] == "wait=60"
    assert time.monotonic() - start < 1
    other = queued_job(idle_client, tenant)
    for bad in ("wait=abc", "wait=0", "respond-async"):
        start = time.monotonic()
        resp = idle_client.get(f"/v1/jobs/{other}", headers={**tenant.headers, "Prefer": bad})
        assert resp.status_code == 200 and "Preference-Applied" not in resp.headers
        assert time.monotonic() - start < 1


def test_waiters_hold_no_database_connection(settings, storage, tenant):
    """More waiters than the API's pool has connections (10 + 10 overflow): all of them wait, and a plain
    request meanwhile still gets a connection at once."""
    app = create_app(private_queues(settings, f"idle-{uuid.uuid4().hex[:6]}"))
    client = app.test_client()
    job_ids = [queued_job(client, tenant) for _ in range(30)]
    statuses: list[int] = []

    def wait(job_id: str) -> None:
        statuses.append(client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": "wait=4"}).status_code)

    threads = [threading.Thread(target=wait, args=(job_id,)) for job_id in job_ids]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    while app.extensions["clipmask"].finished.waiting() < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.extensions["clipmask"].finished.waiting() == 30
    start = time.monotonic()
    assert client.get(f"/v1/jobs/{job_ids[0]}", headers=tenant.headers).status_code == 200
    assert time.monotonic() - start < 1  # no pool timeout (5 s) behind the waiters
    for t in threads:
        t.join(timeout=30)
    assert statuses == [200] * 30


def test_waiters_are_capped_per_tenant_and_per_process(settings, storage, make_tenant):
    """Past a cap a request is answered at once, as without Prefer (no Preference-Applied), never
    refused: one tenant's waiters can't take every thread from other tenants and health checks."""
    app = create_app(private_queues(settings, f"idle-{uuid.uuid4().hex[:6]}", wait_max_per_process=3,
                                    wait_max_per_tenant=2))
    client = app.test_client()
    greedy, other, third = make_tenant(), make_tenant(), make_tenant()
    greedy_jobs = [queued_job(client, greedy) for _ in range(3)]
    other_job, third_job = queued_job(client, other), queued_job(client, third)
    finished = app.extensions["clipmask"].finished
    answers: list[tuple[int, str | None]] = []

    def wait(tenant, job_id: str) -> None:
        resp = client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": "wait=6"})
        answers.append((resp.status_code, resp.headers.get("Preference-Applied")))

    def held(count: int) -> None:
        deadline = time.monotonic() + 3
        while finished.admitted() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert finished.admitted() == count

    threads = [threading.Thread(target=wait, args=(greedy, job_id)) for job_id in greedy_jobs[:2]]
    for t in threads:
        t.start()
    held(2)
    start = time.monotonic()  # the greedy tenant's third wait: over its cap, answered at once
    resp = client.get(f"/v1/jobs/{greedy_jobs[2]}", headers={**greedy.headers, "Prefer": "wait=6"})
    assert resp.status_code == 200 and "Preference-Applied" not in resp.headers
    assert time.monotonic() - start < 1
    created = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["shirt"]},
                          headers={**greedy.headers, "Prefer": "wait=6"})  # a waited create too
    assert created.status_code == 202 and "Preference-Applied" not in created.headers
    threads.append(threading.Thread(target=wait, args=(other, other_job)))  # another tenant still waits
    threads[-1].start()
    held(3)
    resp = client.get(f"/v1/jobs/{third_job}", headers={**third.headers, "Prefer": "wait=6"})
    assert resp.status_code == 200 and "Preference-Applied" not in resp.headers  # the process is full
    assert client.get("/healthz").status_code == 200
    for t in threads:
        t.join(timeout=30)
    assert sorted(answers) == [(200, "wait=6")] * 3
    assert finished.admitted() == 0
    resp = client.get(f"/v1/jobs/{third_job}", headers={**third.headers, "Prefer": "wait=1"})
    assert resp.headers["Preference-Applied"] == "wait=1"  # slots come back
