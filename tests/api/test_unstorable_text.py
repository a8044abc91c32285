"""Text Postgres can't store (NUL, lone surrogates) and numbers Python can't parse, in every place
a client can put them: each is refused at the edge with its field's code, never a 500."""

from __future__ import annotations

import base64
import io
import json

import pytest

from tests.support.images import make_image

NUL, SURROGATE = "a\x00b", "a\ud800b"
URL = "https://example.com/a.jpg"


def _json(client, tenant, path, raw: str, **headers):
    return client.post(path, data=raw.encode("utf-8", "surrogatepass"), content_type="application/json",
                       headers={**tenant.headers, **headers})


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(("body", "code", "field"), [
    ({"image_url": URL, "prompts": ["BAD"]}, "invalid_prompts", "prompts[0]"),
    ({"image_url": URL, "prompts": ["a"], "metadata": {"sku": "BAD"}}, "invalid_metadata", "metadata.sku"),
    ({"image_url": URL, "prompts": ["a"], "metadata": {"BAD": "1"}}, "invalid_metadata", None),
    ({"image_url": URL + "?q=BAD", "prompts": ["a"]}, "invalid_image_url", "image_url"),
    ({"image_url": URL, "prompts": ["a"], "webhook_url": "https://h.test/BAD"}, "invalid_webhook_url", "webhook_url"),
    ({"image_url": URL, "prompts": ["a"], "BAD": 1}, "invalid_request", None),
])
def test_json_job_fields(client, tenant, bad, body, code, field):
    raw = json.dumps(body).replace("BAD", json.dumps(bad)[1:-1])  # \u0000 or \ud800 escapes in the JSON
    resp = _json(client, tenant, "/v1/jobs", raw)
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert resp.get_json()["code"] == code
    if field:
        assert resp.get_json()["errors"][0]["field"] == field


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
def test_batch_items_and_defaults(client, tenant, bad):
    item = json.dumps({"items": [{"image_url": URL}, {"image_url": URL, "metadata": {"sku": "BAD"}}],
                       "prompts": ["a"]}).replace("BAD", json.dumps(bad)[1:-1])
    resp = _json(client, tenant, "/v1/batches", item)
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_batch_item"
    assert resp.get_json()["errors"][0]["field"] == "items[1].metadata.sku"
    batch = json.dumps({"items": [{"image_url": URL}], "prompts": ["BAD"]}).replace("BAD", json.dumps(bad)[1:-1])
    assert _json(client, tenant, "/v1/batches", batch).get_json()["code"] == "invalid_prompts"


def test_csv_and_jsonl_cells(client, tenant):
    for name, text in (("c.csv", f"image_url,sku\n{URL},{NUL}\n"),
                       ("c.jsonl", json.dumps({"image_url": URL, "prompts": ["a\u0000"]}) + "\n")):
        resp = client.post("/v1/batches", headers=tenant.headers, content_type="multipart/form-data",
                           data={"items": (io.BytesIO(text.encode()), name), "prompts": ["a"]})
        assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_batch_item", resp.get_json()


def test_multipart_fields_and_filename(client, tenant):
    def post(**fields):
        data = {"image": (io.BytesIO(make_image()), fields.pop("filename", "p.jpg")), "prompts": ["a"], **fields}
        return client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers=tenant.headers)

    assert post(prompts=[NUL]).get_json()["code"] == "invalid_prompts"
    assert post(metadata=json.dumps({"k": NUL})).get_json()["code"] == "invalid_metadata"
    assert post(filename="p\x00.jpg").get_json()["code"] == "invalid_filename"
    assert post().status_code == 202


def test_headers_path_ids_query_filters_and_cursors(client, tenant):
    body = json.dumps({"image_url": URL, "prompts": ["a"]})
    resp = _json(client, tenant, "/v1/jobs", body, **{"Idempotency-Key": "k\x00"})
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_idempotency_key"
    for path in ("/v1/jobs/a%00b", "/v1/batches/a%00b", "/v1/batches/a%00b/jobs"):
        assert client.get(path, headers=tenant.headers).status_code == 404
    assert client.post("/v1/jobs/a%00b/cancel", headers=tenant.headers).status_code == 404
    assert client.post("/v1/webhook-deliveries/a%00b/retry", headers=tenant.headers).status_code == 404
    assert client.get("/v1/jobs?batch_id=a%00b", headers=tenant.headers).get_json()["code"] == "invalid_batch_id"
    assert client.get("/v1/webhook-deliveries?job_id=a%00b",
                      headers=tenant.headers).get_json()["code"] == "invalid_job_id"
    cursor = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "x\x00"]).encode()).decode()
    resp = client.get(f"/v1/jobs?cursor={cursor}", headers=tenant.headers)
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_cursor"
    assert client.get("/v1/jobs/a%00b").status_code == 401  # auth still comes first


def test_numbers_python_cannot_parse(client, tenant):
    huge = "1" * 5000  # past Python's 4,300-digit limit on int(str)
    resp = _json(client, tenant, "/v1/jobs", f'{{"image_url": "{URL}", "prompts": ["a"], "threshold": {huge}}}')
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_threshold"
    resp = _json(client, tenant, "/v1/jobs", f'{{"image_url": "{URL}", "prompts": ["a"], "metadata": {{"k": {huge}}}}}')
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_metadata"
    for limit in ("²", "٣", "1" * 5000):
        resp = client.get("/v1/jobs", query_string={"limit": limit}, headers=tenant.headers)
        assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_limit"
