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
from evaluation.sample_data import CLASSES, person, write_folder
from tests.support.api import wait_for_job
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


def raw_safetensors(tensors: dict[str, tuple[str, list[int], bytes]], *, header_pad: int = 0,
                    offsets: dict[str, list[int]] | None = None) -> bytes:
    """A safetensors file written by hand, so that it can say what the library never writes."""
    header, body = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": (offsets or {}).get(name, [len(body), len(body) + len(data)])}
        body += data
    text = json.dumps(header).encode() + b" " * header_pad
    return len(text).to_bytes(8, "little") + text + body


def test_weights_the_worker_could_not_load_are_refused_and_nothing_is_stored(client, tenant, folder, storage):
    """As the loader reads them: dtypes, each span its shape times its dtype's size, no overlaps,
    finite values, a bounded header. A refused upload leaves no object in the bucket."""
    tensors = load_file(str(folder / "decoder.safetensors"))
    as_raw = {k: ("F32", list(v.shape), v.float().numpy().tobytes()) for k, v in tensors.items()}
    name = next(k for k in tensors if k.startswith("decoder.") and tensors[k].dim() == 2)
    other = next(k for k in tensors if k != name)
    second = list(as_raw)[1]  # its span is made to start where the first tensor's does
    nan = tensors[name].float().clone()
    nan.view(-1)[7] = float("nan")
    inf = tensors[name].float().clone()
    inf.view(-1)[0] = float("inf")
    shapes_right_bytes_wrong = {k: (dtype, shape, b"\0\0\0\0") for k, (dtype, shape, _) in as_raw.items()}
    cases = {
        "every span 4 bytes": raw_safetensors(shapes_right_bytes_wrong,
                                              offsets={k: [0, 4] for k in shapes_right_bytes_wrong}),
        "an unknown dtype": raw_safetensors({**as_raw, name: ("Q7", *as_raw[name][1:])}),
        "an integer dtype": raw_safetensors({**as_raw, name: ("I32", *as_raw[name][1:])}),
        "a span that is not its shape": raw_safetensors({**as_raw, name: ("F16", *as_raw[name][1:])}),
        "overlapping spans": raw_safetensors(as_raw, offsets={second: [0, len(as_raw[second][2])]}),
        "a NaN": raw_safetensors({**as_raw, name: ("F32", list(nan.shape), nan.numpy().tobytes())}),
        "an infinity": raw_safetensors({**as_raw, name: ("F32", list(inf.shape), inf.numpy().tobytes())}),
        "a 16 MiB header": raw_safetensors(as_raw, header_pad=16 << 20),
        "a NaN in bf16": raw_safetensors({**as_raw, other: ("BF16", list(tensors[other].shape),
                                          tensors[other].float().clone().fill_(float("nan")).bfloat16().view(torch.int16)
                                          .numpy().tobytes())}),
    }
    before = storage.list_keys(f"models/{tenant.tenant_id}/")
    for case, weights in cases.items():
        resp = push(client, tenant, folder, f"broken-{uuid.uuid4().hex[:6]}", weights=weights)
        assert (resp.status_code, resp.get_json()["code"]) == (422, "invalid_model_weights"), (case, resp.get_json())
    assert storage.list_keys(f"models/{tenant.tenant_id}/") == before
    half = {k: v.half() for k, v in tensors.items()}  # half precision is a dtype the loader takes
    path = folder.parent / f"half-{uuid.uuid4().hex[:6]}.safetensors"
    save_file(half, str(path))
    half_resp = push(client, tenant, folder, f"half-{uuid.uuid4().hex[:6]}", weights=path.read_bytes())
    assert half_resp.status_code == 201, half_resp.get_json()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_manifest_with_a_non_finite_number_is_422_and_stores_nothing(client, make_tenant, folder, storage, number):
    tenant = make_tenant()
    text = (folder / "clipmask-model.json").read_text()
    manifest = json.loads(text)
    broken = json.dumps({**manifest, "metrics": {"miou": 0.5}}).replace("0.5", number).encode()
    resp = push(client, tenant, folder, "nan-metrics", manifest=broken)
    assert (resp.status_code, resp.get_json()["code"]) == (422, "invalid_model_manifest"), resp.get_json()
    assert storage.list_keys(f"models/{tenant.tenant_id}/") == []
    assert client.get("/v1/models/nan-metrics", headers=tenant.headers).status_code == 404


def test_idempotency_key_on_model_and_preset_creates(client, make_tenant, folder, storage):
    """A replay with the same key and body answers the first 201 (not 409 model_exists); the same key
    with another body is 409 idempotency_key_reused and creates nothing."""
    tenant = make_tenant()
    keyed = {**tenant.headers, "Idempotency-Key": f"push-{uuid.uuid4().hex}"}

    def post(model_id: str):
        files = {"manifest": (io.BytesIO((folder / "clipmask-model.json").read_bytes()), "m.json"),
                 "weights": (io.BytesIO((folder / "decoder.safetensors").read_bytes()), "d.safetensors")}
        return client.post("/v1/models", data={"id": model_id, **files}, headers=keyed,
                           content_type="multipart/form-data")

    first, again = post("keyed"), post("keyed")
    assert first.status_code == again.status_code == 201 and again.get_json() == first.get_json()
    assert again.headers["Location"] == "/v1/models/keyed" and again.headers["Idempotent-Replayed"] == "true"
    other = post("keyed-2")
    assert (other.status_code, other.get_json()["code"]) == (409, "idempotency_key_reused")
    assert client.get("/v1/models/keyed-2", headers=tenant.headers).status_code == 404

    preset_key = {**tenant.headers, "Idempotency-Key": f"preset-{uuid.uuid4().hex}"}
    body = {"id": "tops", "labels": [{"name": "top", "prompts": ["a top"]}]}
    made = client.post("/v1/presets", json=body, headers=preset_key)
    replay = client.post("/v1/presets", json=body, headers=preset_key)
    assert made.status_code == replay.status_code == 201 and replay.get_json() == made.get_json()
    assert replay.headers["Location"] == "/v1/presets/tops"
    changed = client.post("/v1/presets", json={**body, "id": "tops-2"}, headers=preset_key)
    assert (changed.status_code, changed.get_json()["code"]) == (409, "idempotency_key_reused")
    assert client.get("/v1/presets/tops-2", headers=tenant.headers).status_code == 404
    plain = client.post("/v1/presets", json=body, headers=tenant.headers)  # without a key: as before
    assert (plain.status_code, plain.get_json()["code"]) == (409, "preset_exists")


def test_deleting_a_model_never_strands_a_create_with_the_same_weights(settings, make_tenant, folder, storage):
    """The delete counts the models sharing the content-addressed weights under the tenant's models
    lock: a create of the same bytes that commits around it always finds its weights."""
    import threading

    tenant = make_tenant()
    apps = [create_app(settings).test_client() for _ in range(2)]
    key = None
    for round_ in range(6):
        assert push(apps[0], tenant, folder, f"a{round_}").status_code == 201
        results: dict[str, int] = {}

        def delete(round_: int = round_, results: dict[str, int] = results) -> None:
            results["delete"] = apps[0].delete(f"/v1/models/a{round_}", headers=tenant.headers).status_code

        def create(round_: int = round_, results: dict[str, int] = results) -> None:
            results["create"] = push(apps[1], tenant, folder, f"b{round_}").status_code

        threads = [threading.Thread(target=delete), threading.Thread(target=create)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {"delete": 204, "create": 201}
        model = apps[1].get(f"/v1/models/b{round_}", headers=tenant.headers).get_json()
        key = f"models/{tenant.tenant_id}/{model['revision'].removeprefix('sha256:')}.safetensors"
        assert storage.list_keys(key) == [key], f"round {round_}: the weights of b{round_} are gone"
        assert apps[1].delete(f"/v1/models/b{round_}", headers=tenant.headers).status_code == 204
        assert storage.list_keys(key) == []


def test_the_per_tenant_limit_and_deleting(settings, storage, make_tenant, folder, sessions):
    capped = create_app(settings.model_copy(update={"max_models_per_tenant": 1})).test_client()
    tenant = make_tenant()
    assert push(capped, tenant, folder, "one").status_code == 201
    over = push(capped, tenant, folder, "two")
    assert over.status_code == 409 and over.get_json()["code"] == "model_limit_reached"
    from shared.db import session_scope
    from shared.tables import ServedBase
    from shared.tuned_models import record_base

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


def test_bases_say_whether_they_are_served_and_go_when_no_worker_served_them_for_a_day(client, settings, sessions,
                                                                                       make_tenant, image_server):
    """A base is `served` while a worker says so; one no worker served for a day is no longer listed
    or accepted, so a job naming it is 422 unknown_model instead of running on another base."""
    import datetime as dt

    from shared.clock import utcnow
    from shared.db import session_scope
    from shared.tables import ServedBase
    from shared.tuned_models import record_base

    tenant = make_tenant()
    names = [f"acme/base-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    ages = [dt.timedelta(seconds=5), dt.timedelta(minutes=10), dt.timedelta(days=2)]
    with session_scope(sessions) as session:
        for name in names:
            record_base(session, model_id=name, revision="r1", decoder={}, projection_dim=8)
    with session_scope(sessions) as session:
        for name, age in zip(names, ages, strict=True):
            session.get(ServedBase, name).updated_at = utcnow() - age
    try:
        listed = {m["id"]: m for m in client.get("/v1/models", headers=tenant.headers).get_json()["data"]}
        assert listed[names[0]]["served"] is True and listed[names[1]]["served"] is False
        assert listed[names[0]]["family"] == "clipseg" and "finetune" in listed[names[0]]["capabilities"]
        assert names[2] not in listed  # nobody served it for two days
        assert client.get(f"/v1/models/{names[2]}", headers=tenant.headers).status_code == 404
        url = image_server.add(f"/b-{uuid.uuid4().hex[:8]}.png", png(person(3)[0]), content_type="image/png")
        gone = client.post("/v1/jobs", json={"image_url": url, "model": names[2]}, headers=tenant.headers)
        assert (gone.status_code, gone.get_json()["code"]) == (422, "unknown_model")
        kept = client.post("/v1/jobs", json={"image_url": url, "prompts": ["a"], "model": names[1]},
                           headers=tenant.headers)
        assert kept.status_code == 202, kept.get_json()
        client.post(f"/v1/jobs/{kept.get_json()['id']}/cancel", headers=tenant.headers)
    finally:
        with session_scope(sessions) as session:
            for name in names:
                session.delete(session.get(ServedBase, name))


def test_a_model_runs_only_on_the_exact_base_it_was_made_for(settings, sessions, make_tenant, folder, image_server):
    """The base a fine-tuned model was made for is served again at another revision: a job naming
    the model is refused (422 unsupported_base_model), and one queued before the change fails with
    that code instead of running on the other backbone."""
    from shared.db import session_scope
    from shared.queue import make_celery
    from shared.tables import ServedBase
    from worker.bootstrap import build_deps
    from worker.runner import run_job

    tenant = make_tenant()
    idle = create_app(private_queues(settings, f"exact-{uuid.uuid4().hex[:6]}")).test_client()  # nobody serves it
    assert push(idle, tenant, folder, "exact").status_code == 201
    url = image_server.add(f"/e-{uuid.uuid4().hex[:8]}.png", png(person(6)[0]), content_type="image/png")
    queued = idle.post("/v1/jobs", json={"image_url": url, "model": "exact"}, headers=tenant.headers).get_json()["id"]
    with session_scope(sessions) as session:
        base = session.get(ServedBase, settings.model)
        revision, base.revision = base.revision, "sha256:" + "0" * 64  # the base was replaced
    try:
        refused = idle.post("/v1/jobs", json={"image_url": url, "model": "exact"}, headers=tenant.headers)
        assert (refused.status_code, refused.get_json()["code"]) == (422, "unsupported_base_model")
        deps = build_deps(settings, make_celery(settings))
        with mock_revision(deps, "sha256:" + "0" * 64):  # this worker serves the replacement
            assert run_job(queued, deps=deps) == "failed"
        job = idle.get(f"/v1/jobs/{queued}", headers=tenant.headers).get_json()
        assert job["error"]["code"] == "unsupported_base_model" and "exact" in job["error"]["message"]
    finally:
        with session_scope(sessions) as session:
            session.get(ServedBase, settings.model).revision = revision


def mock_revision(deps, revision: str):
    """The worker's loaded base reports `revision` (as a worker that loaded a replaced checkpoint would)."""
    from unittest import mock

    return mock.patch.object(type(deps.segmenter()), "model_revision", new_callable=mock.PropertyMock,
                             return_value=revision)


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
