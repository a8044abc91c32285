"""Visual prompts, embeddings and similarity search end to end: API -> real worker (tiny CLIPSeg) ->
Postgres with pgvector -> POST /v1/search."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from api import create_app
from shared.db import session_scope
from shared.retention import purge_expired
from shared.storage import example_key
from shared.tables import Embedding, Job
from tests.support.api import wait_for_job
from tests.support.images import make_image

pytestmark = pytest.mark.usefixtures("worker")


def photo(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A distinct picture per seed: smooth colour fields and a few blocks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.uniform(0, 1, 3)
    base = np.stack([xx / width * tint[0], yy / height * tint[1], (xx + yy) / (width + height) * tint[2]], -1) * 255
    for _ in range(3):
        x, y = rng.integers(0, width - 30), rng.integers(0, height - 30)
        base[y:y + 30, x:x + 30] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def submit(client, tenant, image_server, image: bytes, **fields) -> dict:
    url = image_server.add(f"/s-{uuid.uuid4().hex[:8]}.png", image, content_type="image/png")
    resp = client.post("/v1/jobs", json={"image_url": url, **fields}, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def run(client, tenant, image_server, image: bytes, **fields) -> dict:
    job = wait_for_job(client, tenant, submit(client, tenant, image_server, image, **fields)["id"])
    assert job["status"] == "succeeded", job
    return job


def search(client, tenant, **body) -> dict:
    resp = client.post("/v1/search", json=body, headers=tenant.headers)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def projection_dim(settings) -> int:
    with open(f"{settings.model}/config.json") as f:
        return int(json.load(f)["projection_dim"])


def test_embeddings_have_the_model_length_and_unit_norm(client, tenant, image_server, settings):
    job = run(client, tenant, image_server, photo(1), prompts=["shirt", "pants"], embed=["image", "masks"],
              threshold=0.5)
    dim = projection_dim(settings)
    assert job["embed"] == ["image", "masks"] and job["embedding_model"] == settings.model
    assert len(job["embedding"]) == dim and abs(np.linalg.norm(job["embedding"]) - 1) < 1e-4
    for result in job["results"]:
        if result["bbox"] is None:
            assert result["embedding"] is None  # an empty mask has no crop
        else:
            assert len(result["embedding"]) == dim and abs(np.linalg.norm(result["embedding"]) - 1) < 1e-4
    plain = run(client, tenant, image_server, photo(1), prompts=["shirt"])
    assert plain["embedding"] is None and plain["embedding_model"] is None and "embedding" not in plain["results"][0]


def test_a_job_is_found_first_by_its_own_embedding_and_by_its_image(client, tenant, image_server):
    images = [photo(seed) for seed in (11, 12, 13)]
    jobs = [run(client, tenant, image_server, img, embed=["image"], metadata={"n": str(i)})
            for i, img in enumerate(images)]
    assert all(j["results"] == [] for j in jobs)  # embedding-only jobs: no labels, valid
    for job in jobs:
        hits = search(client, tenant, job_id=job["id"])["data"]
        assert hits[0]["job_id"] == job["id"] and hits[0]["score"] >= 0.99
        assert hits[0]["result_index"] is None and hits[0]["prompt"] is None and hits[0]["mask_url"] is None
    by_image = search(client, tenant, image_base64=base64.b64encode(images[1]).decode())["data"]
    assert by_image[0]["job_id"] == jobs[1]["id"] and by_image[0]["score"] >= 0.99
    assert by_image[0]["metadata"] == {"n": "1"}
    # a data: URI, as POST /v1/jobs takes it (it used to reach the worker undecoded: 503)
    by_uri = search(client, tenant, image_base64="data:image/png;base64," + base64.b64encode(images[1]).decode())
    assert [h["job_id"] for h in by_uri["data"]] == [h["job_id"] for h in by_image]


def test_prompts_longer_than_clips_77_tokens_are_truncated_not_failed(client, tenant, image_server):
    """200 characters pass the field's rule and can run past CLIP's 77 tokens: the job succeeds (it
    used to fail as `internal`) and a text search answers 200 (it used to be 503 with Retry-After)."""
    long = ("a long sleeved striped cotton shirt with buttons and a collar " * 4)[:200].strip()
    job = run(client, tenant, image_server, photo(41), prompts=[long, "pants"], embed=["masks"], threshold=0.3)
    assert [r["prompt"] for r in job["results"]] == [long, "pants"]
    hits = search(client, tenant, text=long, scope="masks")["data"]  # (search() asserts the 200)
    assert all(h["job_id"] == job["id"] for h in hits)


def test_text_search_is_sorted_and_masks_scope_finds_results(client, tenant, image_server):
    for seed in (21, 22, 23):
        run(client, tenant, image_server, photo(seed), prompts=["dress"], embed=["image", "masks"], threshold=0.3)
    hits = search(client, tenant, text="a red floral dress", limit=5)["data"]
    assert 1 <= len(hits) <= 5
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    masks = search(client, tenant, text="a red floral dress", scope="masks")["data"]
    assert masks and all(h["result_index"] is not None and h["prompt"] == "dress" for h in masks)
    assert all(requests.get(h["mask_url"], timeout=10).status_code == 200 for h in masks)


def test_another_tenants_embeddings_never_appear(client, make_tenant, image_server):
    mine, theirs = make_tenant(), make_tenant()
    image = photo(31)
    their_job = run(client, theirs, image_server, image, embed=["image"])  # the exact same picture
    my_job = run(client, mine, image_server, photo(32), embed=["image"])
    for body in ({"image_base64": base64.b64encode(image).decode()}, {"text": "anything"},
                 {"job_id": my_job["id"]}):
        hits = search(client, mine, limit=100, **body)["data"]
        assert {h["job_id"] for h in hits} == {my_job["id"]}
    resp = client.post("/v1/search", json={"job_id": their_job["id"]}, headers=mine.headers)
    assert resp.status_code == 404 and resp.get_json()["code"] == "not_found"


def test_batch_and_metadata_filters_narrow_the_search(client, make_tenant, image_server):
    tenant = make_tenant()
    urls = [image_server.add(f"/b-{uuid.uuid4().hex[:8]}.png", photo(40 + i), content_type="image/png")
            for i in range(3)]
    resp = client.post("/v1/batches", headers=tenant.headers, json={
        "embed": ["image"], "items": [{"image_url": u, "metadata": {"sku": f"s{i}"}} for i, u in enumerate(urls)]})
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]
    outside = run(client, tenant, image_server, photo(49), embed=["image"], metadata={"sku": "s0"})
    for _ in range(120):
        batch = client.get(f"/v1/batches/{batch_id}", headers=tenant.headers).get_json()
        if batch["status"] == "completed":
            break
        import time
        time.sleep(0.5)
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 3
    manifest = [json.loads(line) for line in requests.get(batch["results_url"], timeout=10).text.splitlines()]
    assert all(len(job["embedding"]) > 0 for job in manifest)  # manifests carry the embeddings
    everyone = search(client, tenant, job_id=outside["id"], limit=100)["data"]
    assert len(everyone) == 4
    in_batch = search(client, tenant, job_id=outside["id"], batch_id=batch_id, limit=100)["data"]
    assert {h["job_id"] for h in in_batch} == {j["id"] for j in manifest}
    sku0 = search(client, tenant, job_id=outside["id"], metadata={"sku": "s0"}, limit=100)["data"]
    assert sorted(h["metadata"]["sku"] for h in sku0) == ["s0", "s0"]
    both = search(client, tenant, job_id=outside["id"], metadata={"sku": "s0"}, batch_id=batch_id)["data"]
    assert len(both) == 1 and both[0]["job_id"] != outside["id"]


def test_image_prompts_results_and_their_source(client, tenant, image_server):
    example = photo(51, 64, 64)
    example_url = image_server.add(f"/ex-{uuid.uuid4().hex[:8]}.png", example, content_type="image/png")
    job = run(client, tenant, image_server, photo(52), preset="clothing", prompts=["shirt"], threshold=0.5,
              image_prompts=[{"label": "gown", "image_url": example_url},
                             {"label": "pattern", "image_base64": base64.b64encode(example).decode()}])
    assert [(r["prompt"], r["source"]) for r in job["results"]] == [
        ("upper_body", "preset"), ("lower_body", "preset"), ("full_body", "preset"), ("shirt", "text"),
        ("gown", "image"), ("pattern", "image")]
    assert job["image_prompts"][0] == {"label": "gown", "image_url": example_url}
    shown = job["image_prompts"][1]
    assert shown["label"] == "pattern" and shown["bytes"] == len(example) and "key" not in shown
    # the same example by URL and by bytes conditions the same way
    gown, pattern = job["results"][4], job["results"][5]
    assert gown["score"] == pytest.approx(pattern["score"], abs=1e-6) and gown["bbox"] == pattern["bbox"]


def test_an_image_prompt_that_cannot_be_fetched_fails_the_job(client, tenant, image_server):
    missing = image_server.add(f"/gone-{uuid.uuid4().hex[:8]}.png", b"", status=404)
    created = submit(client, tenant, image_server, photo(53), prompts=["shirt"],
                     image_prompts=[{"label": "gown", "image_url": missing}])
    job = wait_for_job(client, tenant, created["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "image_fetch_failed"
    assert "image_prompts[0]" in job["error"]["message"]
    not_image = image_server.add(f"/txt-{uuid.uuid4().hex[:8]}.png", b"hello, not an image")
    job = wait_for_job(client, tenant, submit(client, tenant, image_server, photo(54), prompts=["shirt"],
                                              image_prompts=[{"label": "x", "image_url": not_image}])["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "image_invalid"


def test_retention_deletes_an_example_with_the_last_job_that_names_it(client, make_tenant, image_server, sessions,
                                                                       storage):
    """Examples sent as base64 are stored once by content and shared: retention removes one with the
    last job that names it, and says how many it removed."""
    tenant = make_tenant()
    shared_example, own_example = photo(61, 64, 64), photo(62, 64, 64)

    def with_example(example: bytes) -> dict:
        return run(client, tenant, image_server, photo(63), image_prompts=[
            {"label": "pattern", "image_base64": base64.b64encode(example).decode()}])

    first, second, alone = with_example(shared_example), with_example(shared_example), with_example(own_example)
    shared_key, own_key = (example_key(tenant_id=tenant.tenant_id, digest=hashlib.sha256(e).hexdigest())
                           for e in (shared_example, own_example))
    assert storage.list_keys(shared_key) == [shared_key] and storage.list_keys(own_key) == [own_key]

    def age(*jobs):
        with session_scope(sessions) as session:
            for job in jobs:
                session.get(Job, job["id"]).created_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)

    def purge():
        return purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=90))

    age(first, alone)
    purged = purge()
    assert purged.jobs >= 2 and purged.examples >= 1
    assert storage.list_keys(own_key) == []  # its only job went
    assert storage.list_keys(shared_key) == [shared_key]  # still named by the second job
    again = run(client, tenant, image_server, photo(64), image_prompts=[  # and still usable
        {"label": "pattern", "image_base64": base64.b64encode(shared_example).decode()}])
    age(second, again)
    assert purge().examples >= 1 and storage.list_keys(shared_key) == []  # its last job went


def test_retention_deletes_embeddings_with_their_jobs(client, make_tenant, image_server, sessions, storage):
    tenant = make_tenant()
    job = run(client, tenant, image_server, photo(61), prompts=["hat"], embed=["image", "masks"], threshold=0.01)
    with session_scope(sessions) as session:
        assert session.query(Embedding).filter(Embedding.job_id == job["id"]).count() == 2
        session.get(Job, job["id"]).created_at -= dt.timedelta(days=60)
    purge_expired(sessions=sessions, storage=storage, older_than=dt.timedelta(days=30))
    with session_scope(sessions) as session:
        assert session.query(Embedding).filter(Embedding.job_id == job["id"]).count() == 0
    assert search(client, tenant, text="a hat")["data"] == []


def test_search_answers_503_when_no_worker_answers(settings, storage, tenant):
    lonely = settings.model_copy(update={"interactive_queue": f"nobody-{uuid.uuid4().hex[:6]}",
                                         "search_timeout_s": 1.0})
    app = create_app(lonely)
    app.testing = True
    resp = app.test_client().post("/v1/search", json={"text": "a dress"}, headers=tenant.headers)
    assert resp.status_code == 503 and resp.get_json()["code"] == "search_unavailable"
    assert resp.headers["Retry-After"]
    # a stored query needs no model: it answers without a worker
    stored = app.test_client().post("/v1/search", json={"job_id": "job_missing"}, headers=tenant.headers)
    assert stored.status_code == 404


B64 = base64.b64encode(make_image(32, 32)).decode()


@pytest.mark.parametrize(("body", "code"), [
    ({"prompts": ["a"], "embed": ["pixels"]}, "invalid_embed"),
    ({"prompts": ["a"], "embed": "image"}, "invalid_embed"),
    ({"image_prompts": [{"label": "a", "image_base64": B64}] * 5}, "invalid_image_prompts"),
    ({"image_prompts": [{"image_base64": B64}]}, "invalid_image_prompts"),
    ({"image_prompts": [{"label": " ", "image_base64": B64}]}, "invalid_image_prompts"),
    ({"image_prompts": [{"label": "a", "image_base64": B64, "image_url": "https://example.com/a.png"}]},
     "invalid_image_prompts"),
    ({"image_prompts": [{"label": "a"}]}, "invalid_image_prompts"),
    ({"image_prompts": [{"label": "a", "image_url": "ftp://example.com/a.png"}]}, "invalid_image_prompts"),
    ({"image_prompts": [{"label": "a", "image_base64": "***"}]}, "invalid_image_prompts"),
    ({"image_prompts": [{"label": "a", "image_base64": base64.b64encode(b"text").decode()}]}, "invalid_image_prompts"),
    ({"image_prompts": "gown"}, "invalid_image_prompts"),
    ({"prompts": [f"p{i}" for i in range(16)], "preset": "human_parsing"}, "too_many_labels"),
    ({}, "invalid_prompts"),
])
def test_bad_job_options_get_their_code(client, tenant, body, code):
    resp = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", **body}, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == code, resp.get_json()


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 422, "invalid_search_query"),
    ({"text": "a", "job_id": "job_x"}, 422, "invalid_search_query"),
    ({"text": "  "}, 422, "invalid_search_query"),
    ({"text": "x" * 1001}, 422, "invalid_search_query"),
    ({"text": "a", "scope": "pixels"}, 422, "invalid_scope"),
    ({"text": "a", "limit": 0}, 422, "invalid_limit"),
    ({"text": "a", "limit": 101}, 422, "invalid_limit"),
    ({"text": "a", "result_index": 0}, 422, "invalid_result_index"),
    ({"job_id": "job_x", "result_index": -1}, 422, "invalid_result_index"),
    ({"text": "a", "metadata": {"k": 1}}, 422, "invalid_metadata"),
    ({"text": "a", "metadata": "k=v"}, 422, "invalid_metadata"),
    ({"image_url": "file:///etc/passwd"}, 422, "invalid_image_url"),
    ({"image_url": "https://\u0101\u00fd\x0f\x89"}, 422, "invalid_image_url"),  # once a 15 s wait, then 503
    ({"image_base64": "***"}, 422, "invalid_image_base64"),
    ({"text": "a", "colour": "red"}, 422, "unknown_field"),
    ({"job_id": "job_nonexistent"}, 404, "not_found"),
])
def test_bad_search_requests_get_their_code(client, tenant, body, status, code):
    resp = client.post("/v1/search", json=body, headers=tenant.headers)
    assert resp.status_code == status and resp.get_json()["code"] == code, resp.get_json()


def test_search_by_a_job_without_embeddings_says_so(client, tenant, image_server):
    job = run(client, tenant, image_server, photo(71), prompts=["shirt"])
    resp = client.post("/v1/search", json={"job_id": job["id"]}, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "no_embedding"


def test_search_by_an_unreachable_image_is_refused(client, tenant, image_server):
    missing = image_server.add(f"/q-{uuid.uuid4().hex[:8]}.png", b"", status=404)
    resp = client.post("/v1/search", json={"image_url": missing}, headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "image_fetch_failed"
