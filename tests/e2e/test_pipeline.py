"""Submit -> real Celery worker process -> S3 -> poll -> download masks, for every input kind."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from tests.support.api import wait_for_job
from tests.support.images import make_image

pytestmark = pytest.mark.usefixtures("worker")


def download_mask(url: str) -> np.ndarray:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    img = Image.open(io.BytesIO(resp.content))
    assert img.format == "PNG" and img.mode == "L"
    return np.asarray(img)


def check_results(job: dict) -> None:
    """What a user checks: one PNG per prompt, image-sized, 0/255, and stats that agree with it."""
    width, height = job["image"]["width"], job["image"]["height"]
    assert [r["prompt"] for r in job["results"]] == job["prompts"]
    for result in job["results"]:
        mask = download_mask(result["mask_url"])
        assert mask.shape == (height, width)
        assert set(np.unique(mask)) <= {0, 255}
        on = mask == 255
        assert result["area_fraction"] == pytest.approx(on.mean(), abs=1e-6)
        if on.any():
            ys, xs = np.nonzero(on)
            assert result["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert result["score"] >= job["threshold"]
        else:
            assert result["bbox"] is None
            assert result["score"] < job["threshold"]
        assert 0.0 <= result["score"] <= 1.0


def test_url_job_succeeds_with_downloadable_masks(client, tenant, image_server):
    url = image_server.add("/e2e-person.jpg", make_image(200, 300))
    resp = client.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt", "pants", "shoes"],
                                         "metadata": {"sku": "S-1"}}, headers=tenant.headers)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["image"] == {"width": 200, "height": 300}
    assert job["started_at"] and job["finished_at"] and job["started_at"] <= job["finished_at"]
    assert job["metadata"] == {"sku": "S-1"} and job["error"] is None
    check_results(job)


def test_threshold_changes_the_mask(client, tenant, image_server):
    url = image_server.add("/e2e-threshold.jpg", make_image(120, 90))
    areas = []
    for threshold in (0.05, 0.95):
        resp = client.post("/v1/jobs", json={"image_url": url, "prompts": ["shirt"], "threshold": threshold},
                           headers=tenant.headers)
        job = wait_for_job(client, tenant, resp.get_json()["id"])
        assert job["status"] == "succeeded"
        check_results(job)
        areas.append(job["results"][0]["area_fraction"])
    assert areas[0] > areas[1]


def test_base64_job_succeeds(client, tenant):
    encoded = base64.b64encode(make_image(64, 48, fmt="PNG")).decode()
    resp = client.post("/v1/jobs", json={"image_base64": encoded, "prompts": ["dress"]}, headers=tenant.headers)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["image"] == {"width": 64, "height": 48}
    check_results(job)


def test_upload_with_exif_rotation_gives_upright_sized_masks(client, tenant):
    # Stored 160x120 landscape, EXIF orientation 6 (rotate 90 CW): the picture is 120x160 portrait.
    img = Image.open(io.BytesIO(make_image(160, 120)))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    data = {"image": (io.BytesIO(buf.getvalue()), "rotated.jpg"), "prompts": ["shirt", "pants"]}
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["image"] == {"width": 120, "height": 160}
    check_results(job)


@pytest.mark.parametrize(("name", "make_url", "code"), [
    ("404", lambda s: s.base + "/missing.jpg", "image_fetch_failed"),
    ("unresolvable", lambda s: "http://no-such-host.invalid/a.jpg", "image_fetch_failed"),
    ("not an image", lambda s: s.add("/page.html", b"<html>hi</html>", content_type="text/html"), "image_invalid"),
    ("truncated", lambda s: s.add("/truncated.jpg", make_image(300, 300)[:400]), "image_invalid"),
    ("zero bytes", lambda s: s.add("/empty.jpg", b""), "image_invalid"),
    ("redirect loop", lambda s: s.redirect("/loop", s.base + "/loop"), "image_fetch_failed"),
])
def test_bad_images_fail_with_a_code_and_the_worker_lives_on(client, tenant, image_server, name, make_url, code):
    resp = client.post("/v1/jobs", json={"image_url": make_url(image_server), "prompts": ["a"]},
                       headers=tenant.headers)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code
    assert job["error"]["message"]
    assert job["results"] == []
    # the worker is still alive and serving
    ok_url = image_server.add(f"/after-{name.replace(' ', '-')}.jpg", make_image(40, 40))
    ok = client.post("/v1/jobs", json={"image_url": ok_url, "prompts": ["a"]}, headers=tenant.headers)
    assert wait_for_job(client, tenant, ok.get_json()["id"])["status"] == "succeeded"


def test_redirect_is_followed(client, tenant, image_server):
    target = image_server.add("/real.jpg", make_image(50, 40))
    url = image_server.redirect("/moved.jpg", target, status=301)
    resp = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"]}, headers=tenant.headers)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded" and job["image"] == {"width": 50, "height": 40}


def test_image_over_the_pixel_cap_fails_image_too_large(client, tenant):
    # 8000 x 7000 = 56 MP > 50 MP, but a flat PNG of it is small enough to upload.
    buf = io.BytesIO()
    Image.new("L", (8000, 7000)).save(buf, format="PNG", optimize=True)
    data = {"image": (io.BytesIO(buf.getvalue()), "huge.png"), "prompts": ["a"]}
    resp = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)
    assert resp.status_code == 202
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "image_too_large"


def test_list_shows_finished_jobs_with_results(client, tenant, image_server):
    url = image_server.add("/listed.jpg", make_image(30, 30))
    job_id = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a", "b"]},
                         headers=tenant.headers).get_json()["id"]
    assert wait_for_job(client, tenant, job_id)["status"] == "succeeded"
    page = client.get("/v1/jobs?status=succeeded", headers=tenant.headers).get_json()
    listed = {j["id"]: j for j in page["data"]}
    assert len(listed[job_id]["results"]) == 2
    json.dumps(page)  # serialisable as is


def test_worker_logs_carry_job_ids(client, tenant, image_server, worker):
    url = image_server.add("/logged.jpg", make_image(30, 30))
    job_id = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"]}, headers=tenant.headers).get_json()["id"]
    assert wait_for_job(client, tenant, job_id)["status"] == "succeeded"
    lines = [json.loads(line) for line in worker.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job_id]
    assert {"job started (attempt 1)", "job succeeded"} <= {line["msg"] for line in mine}
    assert all(line["tenant_id"] == tenant.tenant_id for line in mine)
