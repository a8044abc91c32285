"""/v1/presets and the new job fields' validation (no worker: what the API answers)."""

from __future__ import annotations

import uuid

import pytest

from shared.presets import BUILTIN

LABELS = [{"name": "blouse", "prompts": ["a blouse", "a women's top"]}, {"name": "jeans", "prompts": ["jeans"]}]


def new_id() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


def test_builtins_are_listed_first_with_their_phrasings(client, tenant):
    resp = client.get("/v1/presets", headers=tenant.headers)
    assert resp.status_code == 200
    data = resp.get_json()["data"]
    assert [p["id"] for p in data[:2]] == ["clothing", "human_parsing"] and all(p["builtin"] for p in data[:2])
    clothing = data[0]
    assert [label["name"] for label in clothing["labels"]] == ["upper_body", "lower_body", "full_body"]
    assert all(len(label["prompts"]) >= 3 for label in clothing["labels"])
    assert len(data[1]["labels"]) == 17
    one = client.get("/v1/presets/human_parsing", headers=tenant.headers).get_json()
    assert one == data[1] and one["object"] == "preset"


def test_create_get_list_delete(client, tenant):
    preset_id = new_id()
    resp = client.post("/v1/presets", json={"id": preset_id, "labels": LABELS}, headers=tenant.headers)
    assert resp.status_code == 201 and resp.headers["Location"] == f"/v1/presets/{preset_id}"
    assert resp.get_json() == {"id": preset_id, "object": "preset", "builtin": False, "labels": LABELS}
    assert client.get(f"/v1/presets/{preset_id}", headers=tenant.headers).get_json()["labels"] == LABELS
    ids = [p["id"] for p in client.get("/v1/presets", headers=tenant.headers).get_json()["data"]]
    assert preset_id in ids
    assert client.delete(f"/v1/presets/{preset_id}", headers=tenant.headers).status_code == 204
    assert client.get(f"/v1/presets/{preset_id}", headers=tenant.headers).status_code == 404
    assert client.delete(f"/v1/presets/{preset_id}", headers=tenant.headers).status_code == 404


def test_presets_are_per_tenant(client, make_tenant):
    owner, other = make_tenant(), make_tenant()
    preset_id = new_id()
    assert client.post("/v1/presets", json={"id": preset_id, "labels": LABELS},
                       headers=owner.headers).status_code == 201
    assert client.get(f"/v1/presets/{preset_id}", headers=other.headers).status_code == 404
    assert preset_id not in [p["id"] for p in client.get("/v1/presets", headers=other.headers).get_json()["data"]]
    assert client.delete(f"/v1/presets/{preset_id}", headers=other.headers).status_code == 404
    job = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "preset": preset_id},
                      headers=other.headers)
    assert job.status_code == 422 and job.get_json()["code"] == "unknown_preset"
    # the same id is free for the other tenant, and stays the owner's own
    other_labels = [{"name": "hat", "prompts": ["a hat"]}]
    assert client.post("/v1/presets", json={"id": preset_id, "labels": other_labels},
                       headers=other.headers).status_code == 201
    assert client.get(f"/v1/presets/{preset_id}", headers=owner.headers).get_json()["labels"] == LABELS


def test_builtins_are_read_only(client, tenant):
    for preset_id in BUILTIN:
        resp = client.delete(f"/v1/presets/{preset_id}", headers=tenant.headers)
        assert resp.status_code == 409 and resp.get_json()["code"] == "preset_read_only"
        resp = client.post("/v1/presets", json={"id": preset_id, "labels": LABELS}, headers=tenant.headers)
        assert resp.status_code == 409 and resp.get_json()["code"] == "preset_exists"


def test_an_id_the_tenant_has_is_409(client, tenant):
    preset_id = new_id()
    client.post("/v1/presets", json={"id": preset_id, "labels": LABELS}, headers=tenant.headers)
    resp = client.post("/v1/presets", json={"id": preset_id, "labels": LABELS}, headers=tenant.headers)
    assert resp.status_code == 409 and resp.get_json()["code"] == "preset_exists"


@pytest.mark.parametrize(("body", "code"), [
    ({"labels": LABELS}, "invalid_preset_id"),
    ({"id": "has space", "labels": LABELS}, "invalid_preset_id"),
    ({"id": "x" * 65, "labels": LABELS}, "invalid_preset_id"),
    ({"id": "ok", "labels": []}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": f"l{i}", "prompts": ["a"]} for i in range(33)]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": "a", "prompts": []}]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": "a", "prompts": ["p"] * 9}]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": "a", "prompts": ["  "]}]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": " ", "prompts": ["a"]}]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": "a", "prompts": ["x"]}, {"name": "a", "prompts": ["y"]}]}, "invalid_labels"),
    ({"id": "ok", "labels": [{"name": "a", "prompts": ["x"], "extra": 1}]}, "invalid_labels"),
    ({"id": "ok", "labels": LABELS, "colour": "red"}, "unknown_field"),
])
def test_bad_presets_get_their_codes(client, tenant, body, code):
    resp = client.post("/v1/presets", json=body, headers=tenant.headers)
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["code"] == code and resp.content_type == "application/problem+json"


URL = "https://example.com/person.jpg"


@pytest.mark.parametrize(("fields", "code"), [
    ({"prompts": ["shirt"], "outputs": ["mask", "png"]}, "invalid_outputs"),
    ({"prompts": ["shirt"], "outputs": []}, "invalid_outputs"),
    ({"prompts": ["shirt"], "outputs": "mask"}, "invalid_outputs"),
    ({"prompts": ["shirt"], "outputs": [1]}, "invalid_outputs"),
    ({"preset": "nope"}, "unknown_preset"),
    ({"preset": "bad id!"}, "unknown_preset"),
    ({"preset": 7}, "unknown_preset"),
    ({"prompts": []}, "invalid_prompts"),
    ({}, "invalid_prompts"),
    ({"preset": "human_parsing", "prompts": [f"p{i}" for i in range(16)]}, "too_many_labels"),
])
def test_bad_job_fields_get_their_codes(client, tenant, fields, code):
    resp = client.post("/v1/jobs", json={"image_url": URL, **fields}, headers=tenant.headers)
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["code"] == code


def test_multipart_takes_preset_and_repeated_outputs(client, tenant):
    import io

    from tests.support.images import make_image

    resp = client.post("/v1/jobs", data={"image": (io.BytesIO(make_image(20, 20)), "a.jpg"), "preset": "clothing",
                                         "outputs": ["cutout", "label_map"]},
                       headers=tenant.headers, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["preset"] == "clothing" and job["outputs_requested"] == ["cutout", "label_map"]
    assert job["prompts"] == [] and job["model"] is None and job["outputs"] == {}
    bad = client.post("/v1/jobs", data={"image": (io.BytesIO(make_image(20, 20)), "a.jpg"), "prompts": "a",
                                        "outputs": ["mask", "nope"]},
                      headers=tenant.headers, content_type="multipart/form-data")
    assert bad.status_code == 422 and bad.get_json()["code"] == "invalid_outputs"


def test_job_labels_are_frozen_at_creation(client, tenant, sessions):
    from shared.tables import Job

    preset_id = new_id()
    client.post("/v1/presets", json={"id": preset_id, "labels": LABELS}, headers=tenant.headers)
    job = client.post("/v1/jobs", json={"image_url": URL, "preset": preset_id, "prompts": ["belt"]},
                      headers=tenant.headers).get_json()
    client.delete(f"/v1/presets/{preset_id}", headers=tenant.headers)
    client.post("/v1/presets", json={"id": preset_id, "labels": [{"name": "other", "prompts": ["x"]}]},
                headers=tenant.headers)
    with sessions() as session:
        row = session.get(Job, job["id"])
        assert row.labels == [
            {"name": "blouse", "prompts": ["a blouse", "a women's top"], "source": "preset"},
            {"name": "jeans", "prompts": ["jeans"], "source": "preset"},
            {"name": "belt", "prompts": ["belt"], "source": "text"},
        ]


def test_presets_per_tenant_are_capped_and_listed_in_pages(settings, storage, make_tenant):
    from api import create_app

    capped = create_app(settings.model_copy(update={"max_presets_per_tenant": 5})).test_client()
    tenant = make_tenant()
    ids = sorted(f"p{i}-{uuid.uuid4().hex[:6]}" for i in range(5))
    for preset_id in ids:
        assert capped.post("/v1/presets", json={"id": preset_id, "labels": LABELS},
                           headers=tenant.headers).status_code == 201
    over = capped.post("/v1/presets", json={"id": new_id(), "labels": LABELS}, headers=tenant.headers)
    assert over.status_code == 409 and over.get_json()["code"] == "preset_limit_reached"
    assert "5 presets" in over.get_json()["detail"]
    # the cap is the tenant's own: another tenant still creates
    assert capped.post("/v1/presets", json={"id": new_id(), "labels": LABELS},
                       headers=make_tenant().headers).status_code == 201
    # pages of 3: built-ins first, then the tenant's by id, every preset once
    seen, cursor, pages = [], None, 0
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = capped.get(f"/v1/presets?{query}", headers=tenant.headers).get_json()
        assert len(body["data"]) <= 3
        seen += [p["id"] for p in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(BUILTIN) + ids and pages == 3
    default = capped.get("/v1/presets", headers=tenant.headers).get_json()
    assert [p["id"] for p in default["data"]] == seen and default["next_cursor"] is None
    # deleting one makes room again
    assert capped.delete(f"/v1/presets/{ids[0]}", headers=tenant.headers).status_code == 204
    assert capped.post("/v1/presets", json={"id": new_id(), "labels": LABELS},
                       headers=tenant.headers).status_code == 201


@pytest.mark.parametrize(("query", "status", "code"), [
    ("limit=0", 422, "invalid_limit"), ("limit=101", 422, "invalid_limit"), ("cursor=xyz", 400, "invalid_cursor"),
    ("cursor=WzEsIDJd", 400, "invalid_cursor"), ("cursor=WyJhIiwgMV0", 400, "invalid_cursor"),
])
def test_bad_preset_pages_get_their_codes(client, tenant, query, status, code):
    resp = client.get(f"/v1/presets?{query}", headers=tenant.headers)
    assert resp.status_code == status and resp.get_json()["code"] == code


@pytest.mark.parametrize("model", [123, "", "no-such-model", "x" * 5000, "a\u0000b", ["m"]])
def test_a_bad_model_on_a_job_is_422(client, tenant, model):
    resp = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["x"], "model": model},
                       headers=tenant.headers)
    assert resp.status_code == 422 and resp.get_json()["code"] == "unknown_model", resp.get_json()
