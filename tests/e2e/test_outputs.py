"""Presets and output kinds end to end: API -> real worker -> S3 -> what a user downloads."""

from __future__ import annotations

import datetime as dt
import io
import uuid

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as coco_mask

from shared.db import session_scope
from shared.presets import BUILTIN
from shared.retention import purge_expired
from shared.tables import Job
from tests.support.api import wait_for_job
from tests.support.images import make_image

pytestmark = pytest.mark.usefixtures("worker")

ALL_OUTPUTS = ["mask", "soft", "rle", "cutout", "label_map", "overlay"]


def fetch(url: str) -> Image.Image:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    return Image.open(io.BytesIO(resp.content))


def run(client, tenant, image_server, **fields) -> dict:
    url = image_server.add(f"/out-{uuid.uuid4().hex[:8]}.jpg", make_image(160, 120))
    resp = client.post("/v1/jobs", json={"image_url": url, **fields}, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_every_output_from_a_preset_and_prompts(client, tenant, image_server):
    job = run(client, tenant, image_server, preset="clothing", prompts=["a red scarf"], outputs=ALL_OUTPUTS,
              threshold=0.5)
    width, height = job["image"]["width"], job["image"]["height"]
    assert job["preset"] == "clothing" and job["prompts"] == ["a red scarf"]
    assert job["outputs_requested"] == ALL_OUTPUTS
    assert [(r["prompt"], r["source"]) for r in job["results"]] == [
        ("upper_body", "preset"), ("lower_body", "preset"), ("full_body", "preset"), ("a red scarf", "text")]
    assert job["model"]["id"] and job["model"]["revision"].startswith("sha256:")  # a local folder's weights
    masks = []
    for result in job["results"]:
        mask_png = fetch(result["mask_url"])
        assert (mask_png.format, mask_png.mode, mask_png.size) == ("PNG", "L", (width, height))
        mask = np.asarray(mask_png)
        masks.append(mask)
        assert set(np.unique(mask)) <= {0, 255}
        soft_png = fetch(result["soft_url"])
        assert (soft_png.format, soft_png.mode, soft_png.size) == ("PNG", "L", (width, height))
        soft = np.asarray(soft_png)
        on, off = soft[mask == 255], soft[mask == 0]
        assert (on.size == 0 or on.min() >= 127) and (off.size == 0 or off.max() <= 128)  # t = 0.5
        want = coco_mask.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
        assert result["rle"] == {"size": [height, width], "counts": want["counts"].decode("ascii")}
        if result["bbox"] is None:
            assert result["cutout_url"] is None
            continue
        x0, y0, x1, y1 = result["bbox"]
        cutout = fetch(result["cutout_url"])
        assert (cutout.format, cutout.mode, cutout.size) == ("PNG", "RGBA", (x1 - x0, y1 - y0))
        assert np.array_equal(np.asarray(cutout)[..., 3], soft[y0:y1, x0:x1])
    label_map_png = fetch(job["outputs"]["label_map_url"])
    assert (label_map_png.format, label_map_png.mode, label_map_png.size) == ("PNG", "P", (width, height))
    label_map = np.asarray(label_map_png)
    anywhere = np.any([m == 255 for m in masks], axis=0)
    assert np.array_equal(label_map > 0, anywhere)
    for index, mask in enumerate(masks):
        assert np.all(mask[label_map == index + 1] == 255)
    overlay = fetch(job["outputs"]["overlay_url"])
    assert (overlay.format, overlay.mode, overlay.size) == ("JPEG", "RGB", (width, height))


def test_default_is_masks_alone(client, tenant, image_server):
    job = run(client, tenant, image_server, prompts=["shirt", "pants"])
    assert job["outputs_requested"] == ["mask"] and job["outputs"] == {} and job["preset"] is None
    assert [set(r) for r in job["results"]] == [
        {"prompt", "source", "mask_url", "bbox", "area_fraction", "score", "refine"}] * 2
    assert job["refine"] == "none" and [r["refine"] for r in job["results"]] == ["none", "none"]


def test_rle_alone_writes_no_objects(client, tenant, image_server, storage):
    job = run(client, tenant, image_server, prompts=["shirt"], outputs=["rle"])
    assert "mask_url" not in job["results"][0] and job["results"][0]["rle"]["size"] == [120, 160]
    assert storage.list_keys(f"masks/{tenant.tenant_id}/{job['id']}/") == []


def test_human_parsing_preset_gives_its_17_labels_in_order(client, tenant, image_server):
    job = run(client, tenant, image_server, preset="human_parsing", outputs=["label_map"])
    assert [r["prompt"] for r in job["results"]] == [label["name"] for label in BUILTIN["human_parsing"]]
    assert len(job["results"]) == 17 and job["prompts"] == []
    assert fetch(job["outputs"]["label_map_url"]).mode == "P"


def test_a_custom_preset_runs_and_its_job_survives_the_preset(client, tenant, image_server, storage):
    preset_id = f"mine-{uuid.uuid4().hex[:6]}"
    labels = [{"name": "blouse", "prompts": ["a blouse", "a women's top"]}, {"name": "jeans", "prompts": ["jeans"]}]
    assert client.post("/v1/presets", json={"id": preset_id, "labels": labels},
                       headers=tenant.headers).status_code == 201
    job = run(client, tenant, image_server, preset=preset_id, outputs=["mask", "cutout"])
    assert client.delete(f"/v1/presets/{preset_id}", headers=tenant.headers).status_code == 204
    again = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).get_json()
    assert [r["prompt"] for r in again["results"]] == ["blouse", "jeans"] and again["preset"] == preset_id
    url = image_server.add(f"/out-{uuid.uuid4().hex[:8]}.jpg", make_image(32, 32))
    gone = client.post("/v1/jobs", json={"image_url": url, "preset": preset_id}, headers=tenant.headers)
    assert gone.status_code == 422 and gone.get_json()["code"] == "unknown_preset"


def test_preset_label_thresholds_apply_unless_the_job_gives_one(client, tenant, image_server):
    """A label's own threshold (from `clipmask eval --calibrate`) cuts its mask when the job gives
    none; a job's threshold applies to every label. A mask is non-empty exactly when score >= t."""
    preset_id = f"cal-{uuid.uuid4().hex[:8]}"
    labels = [{"name": "low", "prompts": ["a shirt"], "threshold": 0.05},
              {"name": "high", "prompts": ["a pair of pants"], "threshold": 0.95},
              {"name": "plain", "prompts": ["a hat"]}]
    created = client.post("/v1/presets", json={"id": preset_id, "labels": labels}, headers=tenant.headers)
    assert created.status_code == 201 and created.get_json()["labels"] == labels
    own = run(client, tenant, image_server, preset=preset_id, outputs=["mask", "label_map"])
    for result, threshold in zip(own["results"], (0.05, 0.95, 0.4), strict=True):
        assert (result["bbox"] is None) == (result["score"] < threshold), (result, threshold)
    forced = run(client, tenant, image_server, preset=preset_id, threshold=0.5)
    assert forced["threshold"] == 0.5
    for result in forced["results"]:
        assert (result["bbox"] is None) == (result["score"] < 0.5), result
    url = image_server.add(f"/b-{uuid.uuid4().hex[:8]}.jpg", make_image(160, 120))
    items = [{"image_url": url, "metadata": {"n": "own"}},
             {"image_url": url, "threshold": 0.5, "metadata": {"n": "0.5"}}]
    batch = client.post("/v1/batches", json={"preset": preset_id, "items": items}, headers=tenant.headers)
    assert batch.status_code == 202, batch.get_json()
    listed = client.get(f"/v1/batches/{batch.get_json()['id']}/jobs", headers=tenant.headers).get_json()["data"]
    by_item = {job["metadata"]["n"]: wait_for_job(client, tenant, job["id"]) for job in listed}
    for result, threshold in zip(by_item["own"]["results"], (0.05, 0.95, 0.4), strict=True):
        assert (result["bbox"] is None) == (result["score"] < threshold), (result, threshold)
    for result in by_item["0.5"]["results"]:
        assert (result["bbox"] is None) == (result["score"] < 0.5), result


def test_retention_deletes_every_output(client, tenant, image_server, storage, sessions):
    job = run(client, tenant, image_server, prompts=["shirt"], outputs=ALL_OUTPUTS)
    prefix = f"masks/{tenant.tenant_id}/{job['id']}/"
    assert len(storage.list_keys(prefix)) >= 4  # mask, soft, label map, overlay (and a cutout if any)
    with session_scope(sessions) as session:
        session.get(Job, job["id"]).created_at -= dt.timedelta(days=60)
    purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=30))
    assert storage.list_keys(prefix) == []


def test_instances_are_parts_of_each_labels_mask_best_first(client, tenant, image_server):
    job = run(client, tenant, image_server, prompts=["shirt", "pants"], outputs=["mask", "instances"], threshold=0.3)
    width, height = job["image"]["width"], job["image"]["height"]
    seen = 0
    for result in job["results"]:
        mask = np.asarray(fetch(result["mask_url"]))
        scores = [i["score"] for i in result["instances"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 100
        covered = np.zeros_like(mask)
        for instance in result["instances"]:
            own = coco_mask.decode({"size": instance["rle"]["size"], "counts": instance["rle"]["counts"].encode()})
            assert own.shape == (height, width) and (mask[own > 0] == 255).all()
            assert own.sum() / own.size == pytest.approx(instance["area_fraction"], abs=1e-6)
            assert own.sum() >= 0.001 * own.size and 0 < instance["score"] <= 1
            covered |= own
            seen += 1
        assert not (covered & (mask == 0)).any()
    assert seen  # the tiny model's masks at 0.3 have parts
