"""image_s3_uri: catalogs already in object storage, read only from buckets an operator opened."""

from __future__ import annotations

import uuid

import pytest

from tests.support.api import wait_for_job
from tests.support.cli import clipmask, lines
from tests.support.images import make_image

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def catalog_bucket(storage):
    name = f"catalog-{uuid.uuid4().hex[:10]}"
    storage._client.create_bucket(Bucket=name)
    storage._client.put_object(Bucket=name, Key="shoes/p1.jpg", Body=make_image(90, 70), ContentType="image/jpeg")
    yield name
    for key in ("shoes/p1.jpg",):
        storage._client.delete_object(Bucket=name, Key=key)
    storage._client.delete_bucket(Bucket=name)


def allow(settings, tenant, *buckets: str) -> dict:
    args = [a for bucket in buckets for a in ("--input-bucket", bucket)]
    return lines(clipmask(settings, "tenant", "limits", tenant.tenant_id, *args))[0]


def create(client, tenant, **fields):
    return client.post("/v1/jobs", json={"prompts": ["shoe"], **fields}, headers=tenant.headers)


def test_an_allowed_bucket_is_read_and_others_are_refused(client, settings, make_tenant, catalog_bucket):
    tenant = make_tenant()
    uri = f"s3://{catalog_bucket}/shoes/p1.jpg"
    refused = create(client, tenant, image_s3_uri=uri)  # none by default
    assert refused.status_code == 422 and refused.get_json()["code"] == "invalid_image_s3_uri"
    assert allow(settings, tenant, catalog_bucket)["input_buckets"] == [catalog_bucket]
    resp = create(client, tenant, image_s3_uri=uri)
    assert resp.status_code == 202 and resp.get_json()["input"] == {"image_s3_uri": uri}
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded" and job["image"] == {"width": 90, "height": 70}
    # another tenant was allowed nothing
    other = create(client, make_tenant(), image_s3_uri=uri)
    assert other.status_code == 422 and other.get_json()["code"] == "invalid_image_s3_uri"


def test_the_deployments_own_bucket_is_not_readable_unless_allowed(client, settings, tenant, storage):
    upload = create(client, tenant, image_base64=__import__("base64").b64encode(make_image(20, 20)).decode())
    own_key = f"uploads/{tenant.tenant_id}/{upload.get_json()['id']}"
    resp = create(client, tenant, image_s3_uri=f"s3://{settings.s3_bucket}/{own_key}")
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_image_s3_uri"


def test_the_deployments_own_bucket_allowed_reads_only_the_tenants_own_uploads(client, settings, make_tenant):
    """An operator who opens the deployment's bucket opens a tenant's own uploads, never another
    tenant's uploads, masks or examples, nor a path that walks out of the tenant's prefix."""
    import base64

    victim, tenant = make_tenant(), make_tenant()
    theirs = wait_for_job(client, victim, create(client, victim, image_base64=base64.b64encode(
        make_image(30, 20)).decode()).get_json()["id"])
    mine = create(client, tenant, image_base64=base64.b64encode(make_image(40, 24)).decode()).get_json()["id"]
    allow(settings, tenant, settings.s3_bucket)
    bucket = f"s3://{settings.s3_bucket}"
    for key in (f"uploads/{victim.tenant_id}/{theirs['id']}",
                f"masks/{victim.tenant_id}/{theirs['id']}/0.png",
                f"uploads/{tenant.tenant_id}/../{victim.tenant_id}/{theirs['id']}",
                f"uploads/{tenant.tenant_id}/./x", f"uploads/{tenant.tenant_id}"):
        resp = create(client, tenant, image_s3_uri=f"{bucket}/{key}")
        assert resp.status_code == 422, key
        problem = resp.get_json()
        assert problem["code"] == "invalid_image_s3_uri" and "only this tenant's uploads" in problem["detail"]
    resp = create(client, tenant, image_s3_uri=f"{bucket}/uploads/{tenant.tenant_id}/{mine}")
    assert resp.status_code == 202
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded" and job["image"] == {"width": 40, "height": 24}


def test_a_missing_object_fails_the_job_with_image_fetch_failed(client, settings, make_tenant, catalog_bucket):
    tenant = make_tenant()
    allow(settings, tenant, catalog_bucket)
    resp = create(client, tenant, image_s3_uri=f"s3://{catalog_bucket}/shoes/missing.jpg")
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "image_fetch_failed"


def test_a_bucket_closed_after_acceptance_fails_the_job(settings, storage, make_tenant, catalog_bucket, sessions):
    """Accepted on an API whose queue nobody serves, closed by the operator, then run: the worker
    checks the bucket again and fails the job rather than reading it."""
    from api import create_app
    from shared.queue import make_celery
    from tests.support.services import private_queues
    from worker.bootstrap import build_deps
    from worker.runner import run_job

    tenant = make_tenant()
    allow(settings, tenant, catalog_bucket)
    idle = create_app(private_queues(settings, f"s3-{uuid.uuid4().hex[:6]}")).test_client()
    job_id = create(idle, tenant, image_s3_uri=f"s3://{catalog_bucket}/shoes/p1.jpg").get_json()["id"]
    assert lines(clipmask(settings, "tenant", "limits", tenant.tenant_id, "--no-input-buckets"))[0][
        "input_buckets"] == []
    deps = build_deps(settings, make_celery(settings))
    assert run_job(job_id, deps=deps) == "failed"
    job = idle.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
    assert job["error"]["code"] == "image_fetch_failed" and "is not open" in job["error"]["message"]


@pytest.mark.parametrize("uri", ["https://x.test/a.jpg", "s3://Bad_Bucket/a.jpg", "s3://ok-bucket/", "s3://ab/k",
                                 "s3:/ok-bucket/k", "s3://ok-bucket/" + "k" * 1025, 7])
def test_malformed_uris_are_422(client, tenant, uri):
    resp = create(client, tenant, image_s3_uri=uri)
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_image_s3_uri"


def test_exactly_one_image_source(client, tenant):
    resp = create(client, tenant, image_s3_uri="s3://ok-bucket/a.jpg", image_url="https://x.test/a.jpg")
    assert resp.status_code == 422 and resp.get_json()["code"] == "multiple_images"


def test_batch_items_from_an_allowed_bucket(client, settings, make_tenant, catalog_bucket):
    tenant = make_tenant()
    uri = f"s3://{catalog_bucket}/shoes/p1.jpg"
    body = {"prompts": ["shoe"], "items": [{"image_s3_uri": uri}, {"image_s3_uri": uri, "image_url": "https://x.t/a"}]}
    resp = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "items[0].image_s3_uri"
    allow(settings, tenant, catalog_bucket)
    resp = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "items[1].image_url"
    body["items"].pop()
    resp = client.post("/v1/batches", json=body, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
