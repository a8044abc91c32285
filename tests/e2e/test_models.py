"""Fine-tuned models end to end: `clipmask finetune` -> POST /v1/models -> a job naming it -> the real
worker serves that decoder on the shared backbone; the masks are what `clipmask eval --model` sees."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from api import create_app
from cli.main import main
from tests.support.api import wait_for_job
from tests.support.garments import CLASSES, person, write_folder
from tests.support.services import private_queues

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def folder(tiny_model_dir, tmp_path_factory) -> Path:
    """A model folder as `clipmask finetune --prompt-tuning` writes it (a few epochs: its numbers
    don't matter here, only that its decoder and label embeddings are its own)."""
    data = write_folder(tmp_path_factory.mktemp("garments"), 12)
    out = tmp_path_factory.mktemp("tuned") / "model"
    assert main(["finetune", str(data), "--preset", "human_parsing", "--model", str(tiny_model_dir), "--out",
                 str(out), "--epochs", "2", "--lr", "5e-3", "--val-fraction", "0.25", "--prompt-tuning",
                 "--quiet"]) == 0
    return out


def push(client, tenant, folder: Path, model_id: str, *, manifest: bytes | None = None,
         weights: bytes | None = None):
    files = {"manifest": (io.BytesIO(manifest if manifest is not None else
                                     (folder / "clipmask-model.json").read_bytes()), "clipmask-model.json"),
             "weights": (io.BytesIO(weights if weights is not None else
                                    (folder / "decoder.safetensors").read_bytes()), "decoder.safetensors")}
    return client.post("/v1/models", data={"id": model_id, **files}, headers=tenant.headers,
                       content_type="multipart/form-data")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_pushed_model_serves_its_labels_as_eval_sees_them(client, tenant, make_tenant, folder, settings,
                                                            image_server, tmp_path):
    created = push(client, tenant, folder, "garments-v1")
    assert created.status_code == 201, created.get_json()
    model = created.get_json()
    manifest = json.loads((folder / "clipmask-model.json").read_text())
    assert model["id"] == "garments-v1" and model["builtin"] is False and model["revision"].startswith("sha256:")
    assert model["base"]["id"] == manifest["base"]["id"] and [x["name"] for x in model["labels"]] == CLASSES
    assert created.headers["Location"] == "/v1/models/garments-v1"
    listed = client.get("/v1/models", headers=tenant.headers).get_json()["data"]
    assert listed[0]["builtin"] is True and listed[0]["id"] == settings.model
    assert "garments-v1" in [m["id"] for m in listed]
    other = make_tenant()  # another tenant's model is invisible, and not usable
    assert client.get("/v1/models/garments-v1", headers=other.headers).status_code == 404
    assert "garments-v1" not in [m["id"] for m in client.get("/v1/models", headers=other.headers).get_json()["data"]]

    image, _ = person(77)
    url = image_server.add(f"/m-{uuid.uuid4().hex[:8]}.png", png(image), content_type="image/png")
    resp = client.post("/v1/jobs", json={"image_url": url, "model": "garments-v1", "outputs": ["soft"]},
                       headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    job = wait_for_job(client, tenant, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert [(r["prompt"], r["source"]) for r in job["results"]] == [(name, "model") for name in CLASSES]
    assert job["model"]["id"] == "garments-v1" and job["model"]["revision"] == model["revision"]
    assert job["model"]["base"]["id"] == settings.model
    served = np.stack([np.asarray(Image.open(io.BytesIO(requests.get(r["soft_url"], timeout=10).content)))
                       for r in job["results"]])
    from evaluation.predict import EnginePredictor, Label

    local = EnginePredictor(str(folder), [Label(x["name"], x["prompts"]) for x in model["labels"]],
                            cpu_dtype=settings.cpu_dtype).predict([image])[0]
    assert served.shape == local.shape and np.abs(served.astype(int) - local.astype(int)).max() <= 1
    refused = client.post("/v1/jobs", json={"image_url": url, "model": "garments-v1"}, headers=other.headers)
    assert refused.status_code == 422 and refused.get_json()["code"] == "unknown_model"


def test_bad_uploads_get_their_codes(client, tenant, folder):
    manifest = json.loads((folder / "clipmask-model.json").read_text())
    tensors = load_file(str(folder / "decoder.safetensors"))
    name = next(k for k in tensors if k.startswith("decoder.") and tensors[k].dim() == 2)

    def weights_with(changed: dict) -> bytes:
        path = folder.parent / f"w-{uuid.uuid4().hex[:6]}.safetensors"
        save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
        return path.read_bytes()

    cases = [
        ({"manifest": b"not json"}, 422, "invalid_model_manifest"),
        ({"manifest": json.dumps({**manifest, "format": 2}).encode()}, 422, "invalid_model_manifest"),
        ({"manifest": json.dumps({**manifest, "base": {"id": "someone/else"}}).encode()}, 422,
         "unsupported_base_model"),
        ({"manifest": b"[" * 100_000}, 422, "invalid_model_manifest"),  # nested past the parser's depth
        ({"manifest": json.dumps({**manifest, "labels": [{"name": "a\u0000b", "prompts": ["x"]}]}).encode()}, 422,
         "invalid_model_manifest"),  # text Postgres can't store
        ({"weights": b"\x00" * 64}, 422, "invalid_model_weights"),
        ({"weights": (folder / "decoder.safetensors").read_bytes()[:-10]}, 422, "invalid_model_weights"),
        ({"weights": weights_with({**tensors, name: torch.zeros(3, 3)})}, 422, "invalid_model_weights"),
        ({"weights": weights_with({k: v for k, v in tensors.items() if k != name})}, 422, "invalid_model_weights"),
    ]
    for change, status, code in cases:
        resp = push(client, tenant, folder, f"bad-{uuid.uuid4().hex[:6]}", **change)
        assert (resp.status_code, resp.get_json()["code"]) == (status, code), (change.keys(), resp.get_json())
    assert push(client, tenant, folder, "Bad Id!").get_json()["code"] == "invalid_model_id"
    assert push(client, tenant, folder, "twice").status_code == 201
    taken = push(client, tenant, folder, "twice")
    assert taken.status_code == 409 and taken.get_json()["code"] == "model_exists"
    missing = client.post("/v1/models", data={"id": "x"}, headers=tenant.headers, content_type="multipart/form-data")
    assert missing.status_code == 422 and missing.get_json()["code"] == "invalid_model_upload"
    assert client.post("/v1/models", json={"id": "x"}, headers=tenant.headers).status_code == 415


def test_the_per_tenant_limit_and_deleting(settings, storage, make_tenant, folder, sessions):
    capped = create_app(settings.model_copy(update={"max_models_per_tenant": 1})).test_client()
    tenant = make_tenant()
    assert push(capped, tenant, folder, "one").status_code == 201
    over = push(capped, tenant, folder, "two")
    assert over.status_code == 409 and over.get_json()["code"] == "model_limit_reached"
    from shared.db import session_scope
    from shared.models import ServedBase
    from shared.tuned import record_base

    with session_scope(sessions) as session:  # a hub-style base id, as a worker serving it records it
        record_base(session, model_id="acme/clipseg-base", revision="abc", decoder={}, projection_dim=8)
    base = capped.delete("/v1/models/acme/clipseg-base", headers=tenant.headers)
    assert base.status_code == 409 and base.get_json()["code"] == "model_read_only"
    assert capped.get("/v1/models/acme/clipseg-base", headers=tenant.headers).get_json()["builtin"] is True
    with session_scope(sessions) as session:
        session.delete(session.get(ServedBase, "acme/clipseg-base"))
    assert capped.delete("/v1/models/one", headers=tenant.headers).status_code == 204
    assert capped.delete("/v1/models/one", headers=tenant.headers).status_code == 404
    assert push(capped, tenant, folder, "two").status_code == 201


def test_a_queued_job_whose_model_was_deleted_fails_with_model_not_found(settings, storage, make_tenant, folder,
                                                                          image_server):
    from shared.queue import make_celery
    from worker.bootstrap import build_deps
    from worker.runner import run_job

    tenant = make_tenant()
    idle = create_app(private_queues(settings, f"models-{uuid.uuid4().hex[:6]}")).test_client()  # nobody serves it
    assert push(idle, tenant, folder, "soon-gone").status_code == 201
    url = image_server.add(f"/g-{uuid.uuid4().hex[:8]}.png", png(person(5)[0]), content_type="image/png")
    created = idle.post("/v1/jobs", json={"image_url": url, "model": "soon-gone"}, headers=tenant.headers)
    job_id = created.get_json()["id"]
    assert idle.delete("/v1/models/soon-gone", headers=tenant.headers).status_code == 204
    assert run_job(job_id, deps=build_deps(settings, make_celery(settings))) == "failed"
    job = idle.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
    assert job["error"]["code"] == "model_not_found" and "soon-gone" in job["error"]["message"]


def test_eval_through_the_api_with_the_model_agrees_with_eval_of_the_folder(settings, tenant, folder, tmp_path,
                                                                             monkeypatch):
    """The before/after numbers a user gets from `clipmask eval --model DIR` are what the deployment
    serves once the folder is pushed: one code path."""
    from tests.support.services import serving

    client = create_app(settings).test_client()
    assert push(client, tenant, folder, "garments-eval").status_code == 201
    data = write_folder(tmp_path / "data", 4, seed=3)
    monkeypatch.setenv("CLIPMASK_CPU_DTYPE", settings.cpu_dtype)
    assert main(["eval", str(data), "--model", str(folder), "--quiet", "--out", str(tmp_path / "local")]) == 0
    monkeypatch.setenv("CLIPMASK_API_KEY", tenant.api_key)
    with serving(create_app(settings)) as url:
        assert main(["eval", str(data), "--api", url, "--model", "garments-eval", "--quiet",
                     "--out", str(tmp_path / "remote")]) == 0
    here, there = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "remote"))
    assert there["predictor"].endswith("(model garments-eval)") and list(there["classes"]) == CLASSES
    for name in CLASSES:
        for key in ("iou", "mask_iou", "precision", "recall"):
            assert there["classes"][name][key] == pytest.approx(here["classes"][name][key], abs=0.01), (name, key)
