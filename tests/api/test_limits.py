"""Per-tenant rate limit and queued-jobs cap (429 with Retry-After), and presigned URL lifetimes."""

from __future__ import annotations

import datetime as dt
import time
from urllib.parse import parse_qs, urlsplit

from api import create_app
from shared.db import session_scope
from shared.tables import Job, Tenant
from tests.support.api import insert_job
from tests.support.cli import clipmask, lines
from tests.support.services import free_port

JOB = {"image_url": "https://example.com/a.jpg", "prompts": ["shirt"]}


def test_rate_limit_per_tenant_with_retry_after(settings, client, make_tenant):
    limited, other = make_tenant(), make_tenant()
    out = lines(clipmask(settings, "tenant", "limits", limited.tenant_id, "--rate-limit", "1", "--burst", "3"))[0]
    assert out["rate_limit_per_s"] == 1.0 and out["rate_limit_burst"] == 3

    codes = [client.get("/v1/jobs", headers=limited.headers).status_code for _ in range(3)]
    assert codes == [200, 200, 200]  # the burst
    refused = client.get("/v1/jobs", headers=limited.headers)
    assert refused.status_code == 429 and refused.mimetype == "application/problem+json"
    assert refused.get_json()["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    assert client.post("/v1/jobs", json=JOB, headers=limited.headers).status_code == 429  # every route
    assert client.get("/v1/jobs", headers=other.headers).status_code == 200  # another tenant is not affected

    time.sleep(int(refused.headers["Retry-After"]) + 0.1)
    assert client.get("/v1/jobs", headers=limited.headers).status_code == 200

    lines(clipmask(settings, "tenant", "limits", limited.tenant_id, "--rate-limit", "-1", "--burst", "-1"))
    assert [client.get("/v1/jobs", headers=limited.headers).status_code for _ in range(10)] == [200] * 10


def test_rate_limiter_lets_requests_through_when_redis_is_down(settings, tenant):
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "rate_limit_per_s": 1.0,
                                       "rate_limit_burst": 1})
    client = create_app(dead).test_client()
    assert [client.get("/v1/jobs", headers=tenant.headers).status_code for _ in range(3)] == [200] * 3
    resp = client.post("/v1/jobs", json=JOB, headers=tenant.headers)  # the queue itself is needed here
    assert resp.status_code == 503 and resp.get_json()["code"] == "dependency_unavailable"


def test_queued_jobs_cap(client, make_tenant, sessions):
    tenant = make_tenant()
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).max_queued_jobs = 2
    first = insert_job(sessions, tenant)
    insert_job(sessions, tenant)
    insert_job(sessions, tenant, status="running")  # running jobs do not count
    refused = client.post("/v1/jobs", json=JOB, headers=tenant.headers)
    assert refused.status_code == 429 and refused.get_json()["code"] == "too_many_queued_jobs"
    assert int(refused.headers["Retry-After"]) > 0
    with sessions() as session:
        assert session.query(Job).filter_by(tenant_id=tenant.tenant_id).count() == 3  # nothing was written

    assert client.post(f"/v1/jobs/{first}/cancel", headers=tenant.headers).status_code == 200
    assert client.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code == 202


def test_mask_urls_are_presigned_for_the_configured_lifetime_and_fresh_on_every_read(settings, tenant, sessions,
                                                                                    storage):
    """What the signature carries (the next test shows the server enforcing it)."""
    short = settings.model_copy(update={"presign_ttl_s": 120})
    client = create_app(short).test_client()
    job_id = insert_job(sessions, tenant, status="succeeded", results=[
        {"prompt": "shirt", "mask_key": "masks/x/0.png", "bbox": None, "area_fraction": 0.0, "score": 0.1}])
    first = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["results"][0]["mask_url"]
    query = parse_qs(urlsplit(first).query)
    assert query["X-Amz-Expires"] == ["120"]
    signed_at = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - signed_at).total_seconds()) < 5
    assert "X-Amz-Signature" in query and "X-Amz-Credential" in query
    time.sleep(1.1)
    again = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["results"][0]["mask_url"]
    assert parse_qs(urlsplit(again).query)["X-Amz-Date"] != query["X-Amz-Date"]  # re-signed on each read


def test_an_expired_mask_url_is_refused_by_the_storage_server(settings, tenant, sessions, storage):
    """SeaweedFS, like S3 and MinIO, checks a presigned URL's expiry: the mask downloads within its
    lifetime and is refused (403) after it; a tampered signature is refused at once."""
    import requests

    key = f"masks/{tenant.tenant_id}/expiry-{time.time_ns()}/0.png"
    storage.put(key, b"\x89PNG fake", content_type="image/png")
    # 2 s (below the setting's 60 s floor, which model_copy does not check) so the test need not wait a minute
    client = create_app(settings.model_copy(update={"presign_ttl_s": 2})).test_client()
    job_id = insert_job(sessions, tenant, status="succeeded", results=[
        {"prompt": "shirt", "mask_key": key, "bbox": None, "area_fraction": 0.0, "score": 0.1}])
    url = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["results"][0]["mask_url"]
    assert requests.get(url, timeout=10).content == b"\x89PNG fake"
    assert requests.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10).status_code == 403
    time.sleep(3.5)
    assert requests.get(url, timeout=10).status_code == 403
    storage.delete([key])
