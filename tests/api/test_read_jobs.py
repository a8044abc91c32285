"""GET /v1/jobs/{id}, GET /v1/jobs (pagination, filters), POST /v1/jobs/{id}/cancel, isolation."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from tests.support.api import insert_job


def test_get_job_and_404s(client, tenant, sessions):
    job_id = insert_job(sessions, tenant)
    resp = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    assert resp.status_code == 200 and resp.get_json()["id"] == job_id
    missing = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=tenant.headers)
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"


def test_another_tenants_job_is_404_on_every_route(client, tenant, make_tenant, sessions):
    job_id = insert_job(sessions, tenant)
    other = make_tenant()
    assert client.get(f"/v1/jobs/{job_id}", headers=other.headers).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=other.headers).status_code == 404
    listed = client.get("/v1/jobs", headers=other.headers).get_json()
    assert job_id not in [j["id"] for j in listed["data"]]
    # and it was not canceled by the attempt
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "queued"


def test_list_is_newest_first_with_cursor_pages(client, tenant, sessions):
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [insert_job(sessions, tenant, created_at=base + dt.timedelta(seconds=i)) for i in range(5)]
    # two jobs in the same instant: the id breaks the tie, nothing is skipped or repeated
    ids.append(insert_job(sessions, tenant, created_at=base + dt.timedelta(seconds=4)))
    seen, cursor = [], None
    while True:
        url = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=tenant.headers).get_json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    created = [client.get(f"/v1/jobs/{i}", headers=tenant.headers).get_json()["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)


def test_list_filters(client, tenant, sessions):
    done = insert_job(sessions, tenant, status="failed")
    queued = insert_job(sessions, tenant, status="queued", batch_id="bat_1")
    failed = client.get("/v1/jobs?status=failed", headers=tenant.headers).get_json()["data"]
    assert [j["id"] for j in failed] == [done]
    in_batch = client.get("/v1/jobs?batch_id=bat_1", headers=tenant.headers).get_json()["data"]
    assert [j["id"] for j in in_batch] == [queued]
    both = client.get("/v1/jobs?status=failed,queued", headers=tenant.headers).get_json()["data"]
    assert {j["id"] for j in both} == {done, queued}


@pytest.mark.parametrize(("query", "status", "code"), [
    ("limit=0", 422, "invalid_limit"),
    ("limit=101", 422, "invalid_limit"),
    ("limit=ten", 422, "invalid_limit"),
    ("status=done", 422, "invalid_status"),
    ("cursor=garbage!!", 400, "invalid_cursor"),
])
def test_list_bad_parameters(client, tenant, query, status, code):
    resp = client.get(f"/v1/jobs?{query}", headers=tenant.headers)
    assert resp.status_code == status
    assert resp.get_json()["code"] == code


def test_cancel_queued_job(client, tenant, sessions):
    job_id = insert_job(sessions, tenant)
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    job = resp.get_json()
    assert job["status"] == "canceled" and job["finished_at"] is not None
    # canceling again is harmless and answers the same
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert again.status_code == 200 and again.get_json()["status"] == "canceled"


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_finished_job_is_409(client, tenant, sessions, status):
    job_id = insert_job(sessions, tenant, status=status)
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 409
    assert resp.get_json()["code"] == "job_not_cancelable"
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == status
