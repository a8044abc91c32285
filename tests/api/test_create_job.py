"""POST /v1/jobs: the three input kinds, idempotency, auth, and every kind of bad input."""

from __future__ import annotations

import base64
import io
import json

import pytest

from api.schemas import JobObject
from tests.support.images import make_image


def _post_json(client, tenant, body, **headers):
    return client.post("/v1/jobs", data=json.dumps(body), content_type="application/json",
                       headers={**tenant.headers, **headers})


def test_create_from_url_answers_202_with_location_and_job(client, tenant, image_server):
    url = image_server.add("/create-url.jpg", make_image())
    resp = _post_json(client, tenant, {"image_url": url, "prompts": ["shirt", " pants "],
                                       "metadata": {"sku": "A1"}})
    assert resp.status_code == 202
    job = resp.get_json()
    JobObject.model_validate(job)  # the documented schema, no extra fields
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["object"] == "job"
    assert job["prompts"] == ["shirt", "pants"]  # trimmed
    assert job["threshold"] == 0.4
    assert job["input"] == {"image_url": url}
    assert job["metadata"] == {"sku": "A1"}
    assert job["results"] == [] and job["image"] is None and job["error"] is None
    assert job["created_at"].endswith("Z")


@pytest.mark.parametrize("data_uri", [False, True])
def test_create_from_base64(client, tenant, data_uri):
    png = make_image(fmt="PNG")
    encoded = base64.b64encode(png).decode()
    if data_uri:
        encoded = "data:image/png;base64," + encoded
    resp = _post_json(client, tenant, {"image_base64": encoded, "prompts": ["dress"], "threshold": 0.5})
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["input"] == {"upload": {"filename": None, "content_type": "image/png", "bytes": len(png)}}
    assert job["threshold"] == 0.5


def test_create_from_multipart_upload(client, tenant):
    data = {
        "image": (io.BytesIO(make_image()), "photo.jpg", "image/jpeg"),
        "prompts": ["shirt", "pants"],
        "threshold": "0.3",
        "metadata": json.dumps({"catalog": "summer"}),
        "webhook_events": ["job.failed"],
    }
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["prompts"] == ["shirt", "pants"]
    assert job["threshold"] == 0.3
    assert job["metadata"] == {"catalog": "summer"}
    assert job["input"]["upload"]["filename"] == "photo.jpg"
    assert job["input"]["upload"]["content_type"] == "image/jpeg"


def test_upload_is_stored_before_the_row(client, tenant, storage, sessions):
    png = make_image(fmt="PNG")
    resp = _post_json(client, tenant, {"image_base64": base64.b64encode(png).decode(), "prompts": ["x"]})
    job_id = resp.get_json()["id"]
    from shared.tables import Job

    with sessions() as session:
        row = session.get(Job, job_id)
    assert storage.get(row.upload_key) == png


def test_idempotency_key_replays_first_response(client, tenant, make_tenant, image_server):
    url = image_server.add("/idem.jpg", make_image())
    body = {"image_url": url, "prompts": ["shirt"]}
    first = _post_json(client, tenant, body, **{"Idempotency-Key": "order-17"})
    again = _post_json(client, tenant, body, **{"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"

    other_body = _post_json(client, tenant, {**body, "prompts": ["pants"]}, **{"Idempotency-Key": "order-17"})
    assert other_body.status_code == 409
    assert other_body.get_json()["code"] == "idempotency_key_reused"

    # Keys are per tenant: another tenant's same key is a new job.
    other = make_tenant()
    theirs = _post_json(client, other, body, **{"Idempotency-Key": "order-17"})
    assert theirs.status_code == 202 and theirs.get_json()["id"] != first.get_json()["id"]

    listed = client.get("/v1/jobs?limit=100", headers=tenant.headers).get_json()["data"]
    assert [j["id"] for j in listed].count(first.get_json()["id"]) == 1


def test_multipart_idempotency_fingerprints_the_file(client, tenant):
    def post(image: bytes):
        data = {"image": (io.BytesIO(image), "a.png"), "prompts": ["x"]}
        return client.post("/v1/jobs", data=data, content_type="multipart/form-data",
                           headers={**tenant.headers, "Idempotency-Key": "upload-1"})

    first = post(make_image(fmt="PNG"))
    assert first.status_code == 202
    assert post(make_image(fmt="PNG")).get_json()["id"] == first.get_json()["id"]
    assert post(make_image(width=50, fmt="PNG")).status_code == 409


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_auth_required(client, headers):
    resp = client.post("/v1/jobs", json={"image_url": "https://x.test/a.jpg", "prompts": ["a"]}, headers=headers)
    assert resp.status_code == 401
    assert resp.content_type == "application/problem+json"
    assert resp.get_json()["code"] == "unauthorized"
    assert client.get("/v1/jobs", headers=headers).status_code == 401


URL = "https://images.example.com/a.jpg"

BAD_JSON_BODIES = [
    ({"image_url": URL}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": []}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": ["  "]}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": "shirt"}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": [f"p{i}" for i in range(17)]}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": ["x" * 201]}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": [3]}, 422, "invalid_prompts"),
    ({"image_url": URL, "prompts": ["a"], "threshold": 0}, 422, "invalid_threshold"),
    ({"image_url": URL, "prompts": ["a"], "threshold": 1}, 422, "invalid_threshold"),
    ({"image_url": URL, "prompts": ["a"], "threshold": "high"}, 422, "invalid_threshold"),
    ({"image_url": URL, "prompts": ["a"], "webhook_url": "ftp://x.test/h"}, 422, "invalid_webhook_url"),
    ({"image_url": URL, "prompts": ["a"], "webhook_events": ["job.done"]}, 422, "invalid_webhook_events"),
    ({"image_url": URL, "prompts": ["a"], "metadata": {"a": 1}}, 422, "invalid_metadata"),
    ({"image_url": URL, "prompts": ["a"], "metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_metadata"),
    ({"image_url": URL, "prompts": ["a"], "metadata": ["sku"]}, 422, "invalid_metadata"),
    ({"image_url": "file:///etc/passwd", "prompts": ["a"]}, 422, "invalid_image_url"),
    ({"image_url": "not a url", "prompts": ["a"]}, 422, "invalid_image_url"),
    ({"image_url": "https://exa mple.com/a.jpg", "prompts": ["a"]}, 422, "invalid_image_url"),
    ({"prompts": ["a"]}, 422, "missing_image"),
    ({"image_url": URL, "image_base64": "aGk=", "prompts": ["a"]}, 422, "multiple_images"),
    ({"image_base64": "!!!not base64!!!", "prompts": ["a"]}, 422, "invalid_image_base64"),
    ({"image_base64": "", "prompts": ["a"]}, 422, "empty_image"),
    ({"image_base64": base64.b64encode(b"just some text").decode(), "prompts": ["a"]}, 415,
     "unsupported_image_type"),
    ({"image_url": URL, "prompts": ["a"], "prompt": "typo"}, 422, "unknown_field"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_JSON_BODIES)
def test_bad_json_input_is_a_clear_problem(client, tenant, body, status, code):
    resp = _post_json(client, tenant, body)
    assert resp.status_code == status, resp.get_json()
    assert resp.content_type == "application/problem+json"
    problem = resp.get_json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["detail"] and problem["title"] and problem["type"]


def test_field_errors_name_the_item(client, tenant):
    problem = _post_json(client, tenant, {"image_url": URL, "prompts": ["ok", "   "]}).get_json()
    assert problem["errors"][0]["field"] == "prompts"
    assert "prompt 1 is blank" in problem["errors"][0]["message"]


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe\xfa", "malformed_json"),
    (b"[1, 2]", "invalid_body"),
    (b'"just a string"', "invalid_body"),
])
def test_malformed_bodies_are_400(client, tenant, raw, code):
    resp = client.post("/v1/jobs", data=raw, content_type="application/json", headers=tenant.headers)
    assert resp.status_code == 400
    assert resp.get_json()["code"] == code


def test_unsupported_content_type_is_415(client, tenant):
    resp = client.post("/v1/jobs", data="prompts=a", content_type="text/plain", headers=tenant.headers)
    assert resp.status_code == 415
    assert resp.get_json()["code"] == "unsupported_media_type"


@pytest.mark.parametrize(("content", "status", "code"), [
    (b"", 422, "empty_image"),
    (b"%PDF-1.4 not an image at all", 415, "unsupported_image_type"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "unsupported_image_type"),
])
def test_bad_uploads(client, tenant, content, status, code):
    data = {"image": (io.BytesIO(content), "file.jpg"), "prompts": ["a"]}
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    assert resp.status_code == status
    assert resp.get_json()["code"] == code


def test_multipart_without_image_part(client, tenant):
    resp = client.post("/v1/jobs", data={"prompts": ["a"]}, content_type="multipart/form-data",
                       headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "missing_image"


def test_multipart_bad_metadata_json(client, tenant):
    data = {"image": (io.BytesIO(make_image()), "a.jpg"), "prompts": ["a"], "metadata": "{oops"}
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_metadata"


def test_oversized_body_is_413(client, tenant, settings):
    big = b"x" * (settings.max_body_bytes + 1)
    resp = client.post("/v1/jobs", data=big, content_type="application/json", headers=tenant.headers)
    assert resp.status_code == 413
    assert resp.content_type == "application/problem+json"
    assert resp.get_json()["code"] == "payload_too_large"

    data = {"image": (io.BytesIO(big), "huge.jpg"), "prompts": ["a"]}
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    assert resp.status_code == 413
