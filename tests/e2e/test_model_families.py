"""Two bases served side by side, as `make up` with CLIPMASK_EXTRA_MODELS runs them: the session's
CLIPSeg worker (the default base) and a SAM 3 worker (`clipmask dev-model --family sam3`) that
takes its own base's queues only. Jobs and batches on each end to end, with instances and presence;
what a family cannot do is 422 unsupported_for_model."""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as coco_mask

from tests.support.api import wait_for_job
from tests.support.images import make_image
from tests.support.services import start_worker, stop_process

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def sam3_base(settings, storage, tmp_path_factory):
    from shared.db import make_engine, make_session_factory
    from shared.tables import ServedBase
    from worker.engine.devmodel import write_sam3_dev_model

    folder = str(write_sam3_dev_model(tmp_path_factory.mktemp("sam3-base")))
    own = settings.model_copy(update={"model": folder, "default_model": settings.model, "worker_metrics_port": 0})
    proc = start_worker(own, tmp_path_factory.mktemp("sam3-worker") / "worker.log", name=f"sam3-{uuid.uuid4().hex[:6]}")
    engine = make_engine(settings.database_url, pool_size=1)
    deadline = time.monotonic() + 60
    while True:  # the worker records its base once its model loaded
        with make_session_factory(engine)() as session:
            if session.get(ServedBase, folder) is not None:
                break
        assert time.monotonic() < deadline, "the SAM 3 worker never recorded its base"
        time.sleep(0.2)
    engine.dispose()
    yield folder
    stop_process(proc)


def post(client, tenant, image_server, **fields):
    url = image_server.add(f"/fam-{uuid.uuid4().hex[:8]}.jpg", make_image(160, 120))
    return client.post("/v1/jobs", json={"image_url": url, **fields}, headers=tenant.headers)


def png(url: str) -> np.ndarray:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_models_lists_each_base_with_its_family(client, tenant, settings, sam3_base):
    bases = {m["id"]: m for m in client.get("/v1/models", headers=tenant.headers).get_json()["data"] if m["builtin"]}
    assert bases[sam3_base]["family"] == "sam3" and bases[settings.model]["family"] == "clipseg"
    assert set(bases[sam3_base]["capabilities"]) == {"box_prompts", "instances", "presence"}
    assert "finetune" in bases[settings.model]["capabilities"]
    assert bases[sam3_base]["served"] and bases[settings.model]["served"]


def test_a_sam3_job_and_a_clipseg_job_side_by_side(client, tenant, image_server, settings, sam3_base):
    outputs = ["mask", "soft", "rle", "instances", "label_map", "overlay", "cutout"]
    sam3 = post(client, tenant, image_server, prompts=["shirt", "pants"], model=sam3_base, outputs=outputs,
                threshold=0.5)
    clipseg = post(client, tenant, image_server, prompts=["shirt"], outputs=["mask", "instances"])
    assert sam3.status_code == 202 and clipseg.status_code == 202, (sam3.get_json(), clipseg.get_json())
    job = wait_for_job(client, tenant, sam3.get_json()["id"])
    other = wait_for_job(client, tenant, clipseg.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert other["status"] == "succeeded" and "presence" not in other["results"][0]
    assert job["model"]["id"] == sam3_base and other["model"]["id"] == settings.model
    assert job["outputs"]["label_map_url"] and job["outputs"]["overlay_url"]
    kept = 0
    for result in job["results"]:
        assert 0 <= result["presence"] <= 1
        mask = png(result["mask_url"]) > 0
        union = np.zeros_like(mask)
        scores = [i["score"] for i in result["instances"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0.5 for s in scores)
        for inst in result["instances"]:
            own = coco_mask.decode(inst["rle"]).astype(bool)
            ys, xs = np.nonzero(own)
            assert inst["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            union |= own
        assert (union == mask).all()  # the label's mask is the union of its kept instances
        assert result["score"] == (scores[0] if scores else 0)
        kept += len(scores)
    assert kept > 0


def test_a_sam3_batch_runs_on_its_base(client, tenant, image_server, sam3_base):
    urls = [image_server.add(f"/famb-{uuid.uuid4().hex[:8]}.jpg", make_image(120, 90)) for _ in range(3)]
    resp = client.post("/v1/batches", json={"prompts": ["dress"], "model": sam3_base, "outputs": ["instances"],
                                             "items": [{"image_url": u} for u in urls]}, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]
    deadline = time.monotonic() + 90
    while (batch := client.get(f"/v1/batches/{batch_id}", headers=tenant.headers).get_json())["status"] == "running":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch["counts"]["succeeded"] == 3, batch


def test_a_sam3_job_with_guided_refine(client, tenant, image_server, sam3_base):
    resp = post(client, tenant, image_server, prompts=["shirt"], model=sam3_base, refine="guided",
                outputs=["mask", "soft"])
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded" and job["results"][0]["refine"] == "guided", job


@pytest.mark.parametrize("fields", [{"embed": ["image"]},
                                    {"image_prompts": [{"label": "x", "image_url": "https://cdn.test/x.jpg"}]}])
def test_what_sam3_cannot_do_is_refused(client, tenant, image_server, sam3_base, fields):
    resp = post(client, tenant, image_server, prompts=["shirt"], model=sam3_base, **fields)
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["code"] == "unsupported_for_model" and body["errors"][0]["field"] == next(iter(fields))


def b64(width: int = 160, height: int = 120) -> str:
    import base64

    return base64.b64encode(make_image(width, height)).decode()


def test_box_prompts_segment_like_the_boxed_examples(client, tenant, sam3_base):
    boxes = [{"label": "like this", "boxes": [[10, 20, 80, 100]], "negative_boxes": [[100, 10, 150, 60]]}]
    resp = client.post("/v1/jobs", json={"image_base64": b64(), "model": sam3_base, "prompts": ["shirt"],
                                         "box_prompts": boxes, "outputs": ["mask", "instances"], "threshold": 0.3},
                       headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert [(r["prompt"], r["source"]) for r in job["results"]] == [("shirt", "text"), ("like this", "box")]
    assert job["box_prompts"] == boxes
    assert 0 <= job["results"][1]["presence"] <= 1


@pytest.mark.parametrize("box", [[10, 20, 5, 100], [-1, 0, 10, 10], [0, 0, 10], [0, 0, 10, float("inf")]])
def test_a_malformed_box_is_refused(client, tenant, sam3_base, box):
    resp = client.post("/v1/jobs", data=json.dumps({"image_base64": b64(), "model": sam3_base, "box_prompts": [
        {"label": "x", "boxes": [box]}]}).replace("Infinity", "1e999"), headers=tenant.headers,
        content_type="application/json")
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_box_prompts", resp.get_json()


def test_a_box_outside_the_image(client, tenant, image_server, sam3_base):
    outside = [{"label": "x", "boxes": [[10, 10, 170, 50]]}]  # the image is 160 wide
    resp = client.post("/v1/jobs", json={"image_base64": b64(), "model": sam3_base, "box_prompts": outside},
                       headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "box_prompts[0].boxes"
    # by URL the size is known only when it runs: the job fails with the same code
    resp = post(client, tenant, image_server, model=sam3_base, box_prompts=outside)
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_box_prompts", job


def test_box_prompts_on_clipseg_are_refused(client, tenant, image_server, sam3_base):
    resp = post(client, tenant, image_server, box_prompts=[{"label": "x", "boxes": [[1, 1, 20, 20]]}])
    assert resp.status_code == 422 and resp.get_json()["code"] == "unsupported_for_model"
