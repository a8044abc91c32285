"""The runner with an engine that decodes JPEGs with their batch (CLIPMASK_DEVICE_DECODE), with
real Postgres and S3: which jobs go undecoded, the same masks as the host decode, error codes
kept. On this CPU machine `device_decode="on"` gives the engine Pillow as its batch decoder."""

from __future__ import annotations

import uuid

import pytest
from PIL import Image

from shared.db import session_scope
from shared.queue import make_celery
from shared.storage import upload_key
from shared.tables import Job
from tests.support.engine import jpeg
from worker.bootstrap import build_deps
from worker.engine.jpeg import EncodedJpeg
from worker.runner import run_job


@pytest.fixture(scope="module")
def device_deps(settings, storage):
    built = build_deps(settings.model_copy(update={"device_decode": "on"}), make_celery(settings))
    assert built.segmenter().decodes_jpeg == "pillow"
    yield built
    built.segmenter().close()


@pytest.fixture(scope="module")
def host_deps(settings, storage):
    built = build_deps(settings.model_copy(update={"device_decode": "off"}), make_celery(settings))
    assert built.segmenter().decodes_jpeg is None
    yield built
    built.segmenter().close()


def upload_job(sessions, storage, tenant, data: bytes, **fields) -> str:
    job_id = str(uuid.uuid4())
    key = upload_key(tenant_id=tenant.tenant_id, job_id=job_id)
    storage.put(key, data, content_type="image/jpeg")
    with session_scope(sessions) as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status="queued", upload_key=key,
                        input={"upload": {"filename": None, "content_type": "image/jpeg", "bytes": len(data)}},
                        prompts=["shirt", "pants"], threshold=0.4, results=[], metadata_={}, **fields))
    return job_id


def finished(sessions, job_id) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_the_runner_sends_a_mask_only_jpeg_undecoded_and_gets_the_same_masks(device_deps, host_deps, sessions,
                                                                                  storage, tenant):
    data = jpeg(900, 600, seed=5, orientation=8)
    seen: list[type] = []
    segmenter = device_deps.segmenter()
    real_run = segmenter.run

    def spy(request):
        seen.append(type(request.image))
        return real_run(request)

    segmenter.run = spy
    try:
        on_device = upload_job(sessions, storage, tenant, data)
        assert run_job(on_device, deps=device_deps) == "succeeded"
        cutout = upload_job(sessions, storage, tenant, data, outputs_requested=["mask", "cutout"])
        assert run_job(cutout, deps=device_deps) == "succeeded"
    finally:
        del segmenter.run
    assert seen == [EncodedJpeg, Image.Image]  # a cutout needs the pixels: decoded in the job thread
    on_host = upload_job(sessions, storage, tenant, data)
    assert run_job(on_host, deps=host_deps) == "succeeded"
    a, b = finished(sessions, on_device), finished(sessions, on_host)
    assert (a.image_width, a.image_height) == (b.image_width, b.image_height) == (600, 900)
    for ra, rb in zip(a.results, b.results, strict=True):
        assert (ra["bbox"], ra["area_fraction"], ra["score"]) == (rb["bbox"], rb["area_fraction"], rb["score"])
        assert storage.get(ra["mask_key"]) == storage.get(rb["mask_key"])


def test_broken_and_oversized_jpegs_fail_with_their_codes_on_this_path(device_deps, sessions, storage, tenant):
    good = jpeg(300, 200, seed=6)
    broken = upload_job(sessions, storage, tenant, good[: len(good) // 2])
    assert run_job(broken, deps=device_deps) == "failed"
    assert finished(sessions, broken).error["code"] == "image_invalid"
    big = upload_job(sessions, storage, tenant, jpeg(3000, 2000, seed=7))
    device_deps.max_pixels, saved = 1_000_000, device_deps.max_pixels
    try:
        assert run_job(big, deps=device_deps) == "failed"
    finally:
        device_deps.max_pixels = saved
    assert finished(sessions, big).error["code"] == "image_too_large"
