"""`refine` end to end: API -> real worker -> S3 -> what a user downloads, for every output kind;
matting's soft maps and cutouts against the guided job's; batches and bad values."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as coco_mask

from tests.support.api import wait_for_job
from tests.support.images import make_image
from worker.engine.refine import band_px

pytestmark = pytest.mark.usefixtures("worker")

ALL_OUTPUTS = ["mask", "soft", "rle", "cutout", "label_map", "overlay"]
PROMPTS = ["shirt", "pants", "a red scarf", "shoes"]


def fetch(url: str) -> np.ndarray:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def run(client, tenant, url: str, **fields) -> dict:
    resp = client.post("/v1/jobs", json={"image_url": url, "prompts": PROMPTS, "threshold": 0.5, **fields},
                       headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    # a fresh environment compiles pymatting's numba kernels once (about 75 s of one core here; the
    # worker starts that at launch, so only a test reaching it early waits)
    job = wait_for_job(client, tenant, resp.get_json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture()
def picture(image_server) -> str:
    return image_server.add(f"/refine-{uuid.uuid4().hex[:8]}.png", make_image(200, 150, fmt="PNG"))


def test_guided_every_output_follows_one_refined_map(client, tenant, picture):
    job = run(client, tenant, picture, outputs=ALL_OUTPUTS, refine="guided")
    plain = run(client, tenant, picture, outputs=["mask"])
    assert job["refine"] == "guided" and plain["refine"] == "none"
    assert [r["refine"] for r in job["results"]] == ["guided"] * 4
    assert [r["refine"] for r in plain["results"]] == ["none"] * 4
    masks = []
    for result, before in zip(job["results"], plain["results"], strict=True):
        mask, soft = fetch(result["mask_url"]), fetch(result["soft_url"])
        assert mask.shape == soft.shape == (150, 200)
        on, off = soft[mask == 255], soft[mask == 0]
        assert (on.size == 0 or on.min() >= 128) and (off.size == 0 or off.max() <= 127)  # t = 0.5
        want = coco_mask.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
        assert result["rle"] == {"size": [150, 200], "counts": want["counts"].decode("ascii")}
        if result["bbox"] is not None:
            x0, y0, x1, y1 = result["bbox"]
            assert np.array_equal(fetch(result["cutout_url"])[..., 3], soft[y0:y1, x0:x1])
        masks.append((mask, fetch(before["mask_url"])))
    assert any(not np.array_equal(guided, bilinear) for guided, bilinear in masks)  # the refinement did something
    label_map = fetch(job["outputs"]["label_map_url"])
    assert np.array_equal(label_map > 0, np.any([m == 255 for m, _ in masks], axis=0))
    assert fetch(job["outputs"]["overlay_url"]).shape == (150, 200, 3)


def test_matting_softens_only_the_outline_and_keeps_the_guided_masks(client, tenant, picture):
    guided = run(client, tenant, picture, outputs=["mask", "soft"], refine="guided")
    matted = run(client, tenant, picture, outputs=["mask", "soft", "cutout"], refine="matting")
    assert matted["refine"] == "matting"
    band = band_px(150, 200)
    matted_any = False
    for g, m in zip(guided["results"], matted["results"], strict=True):
        mask = fetch(m["mask_url"])
        assert np.array_equal(mask, fetch(g["mask_url"]))  # masks, RLE and the label map stay guided
        soft = fetch(m["soft_url"])
        has_outline = 0 < int((mask > 0).sum()) < mask.size
        if m["refine"] == "matting":
            matted_any = True
            assert has_outline
            near = np.zeros_like(mask, dtype=bool)  # within the band of the outline
            ys, xs = np.nonzero(mask != np.roll(mask, 1, axis=1))
            for y, x in zip(ys, xs, strict=True):
                near[max(0, y - band):y + band + 1, max(0, x - band - 1):x + band + 1] = True
            ys, xs = np.nonzero(mask != np.roll(mask, 1, axis=0))
            for y, x in zip(ys, xs, strict=True):
                near[max(0, y - band - 1):y + band + 1, max(0, x - band):x + band + 1] = True
            far = ~near
            assert np.array_equal(soft[far], mask[far])  # known: exactly the mask away from the outline
            x0, y0, x1, y1 = m["bbox"]
            assert np.array_equal(fetch(m["cutout_url"])[..., 3], soft[y0:y1, x0:x1])
        else:  # nothing to matte: the guided soft map
            assert m["refine"] == "guided" and not has_outline
            assert np.array_equal(soft, fetch(g["soft_url"]))
    assert matted_any, [r["bbox"] for r in matted["results"]]


def test_matting_without_soft_outputs_is_the_guided_job(client, tenant, picture):
    job = run(client, tenant, picture, outputs=["mask", "rle"], refine="matting")
    assert job["refine"] == "matting" and {r["refine"] for r in job["results"]} == {"guided"}


def test_refine_in_batches_and_forms(client, tenant, image_server, picture):
    resp = client.post("/v1/batches", headers=tenant.headers, json={
        "prompts": ["shirt"], "refine": "guided",
        "items": [{"image_url": picture}, {"image_url": picture, "refine": "none"}]})
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]
    jobs = client.get(f"/v1/batches/{batch_id}/jobs", headers=tenant.headers).get_json()["data"]
    assert sorted(j["refine"] for j in jobs) == ["guided", "none"]
    form = {"image": (io.BytesIO(make_image(64, 48)), "p.jpg"), "prompts": "shirt", "refine": "guided"}
    resp = client.post("/v1/jobs", data=form, headers=tenant.headers, content_type="multipart/form-data")
    assert resp.status_code == 202 and resp.get_json()["refine"] == "guided"
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded" and job["results"][0]["refine"] == "guided"


@pytest.mark.parametrize("value", ["sharp", "", "GUIDED", 1, None, ["guided"]])
def test_a_bad_refine_is_422_invalid_refine(client, tenant, value):
    resp = client.post("/v1/jobs", json={"image_url": "https://x.test/a.jpg", "prompts": ["a"], "refine": value},
                       headers=tenant.headers)
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["code"] == "invalid_refine"
    resp = client.post("/v1/batches", headers=tenant.headers, json={
        "prompts": ["a"], "items": [{"image_url": "https://x.test/a.jpg", "refine": value}]})
    if value is None:  # an item's null means "the batch's"
        assert resp.status_code == 202
    else:
        assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "items[0].refine"
