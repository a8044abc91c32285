"""Every field, id, filter and header of the create/read/cancel routes with generated text (NUL,
lone surrogates, any code point, huge numbers): the API answers < 500 every time, and a refusal
always carries a code. Real Postgres, so anything that reaches it unchecked would be a 500."""

from __future__ import annotations

import io
import json
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.db import session_scope
from shared.tables import Tenant
from tests.support.images import make_image

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # what a form or a file can carry
URLS = st.builds(lambda t: "https://example.com/" + t, ANY_TEXT)
HUGE = "<<a 5,000-digit number>>"  # spliced into the JSON text: json.dumps itself can't write one
NUMBERS = st.integers() | st.floats() | st.just(HUGE)
VALUES = ANY_TEXT | NUMBERS | st.none() | st.lists(ANY_TEXT, max_size=3)
JOB = st.fixed_dictionaries({"prompts": st.lists(ANY_TEXT, max_size=3) | VALUES}, optional={
    "image_url": URLS | VALUES, "image_base64": ANY_TEXT, "threshold": NUMBERS | VALUES,
    "metadata": st.dictionaries(ANY_TEXT, VALUES, max_size=3) | VALUES, "webhook_url": URLS | VALUES,
    "webhook_events": st.lists(ANY_TEXT | st.sampled_from(["job.failed", "batch.completed"]), max_size=3),
})
_IMAGE = make_image(16, 16)


@pytest.fixture()
def unlimited(tenant, sessions):
    """A tenant without a rate limit: the fuzzer sends hundreds of requests a second."""
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).rate_limit_per_s = 0
    return tenant


def _check(resp) -> None:
    assert resp.status_code < 500, resp.get_data(as_text=True)[:2000]
    if resp.status_code >= 400:
        assert resp.get_json()["code"]


def _dumps(body: object) -> str:
    return json.dumps(body).replace(json.dumps(HUGE), "9" * 5000)


def _path(text: str) -> str:
    return quote_from_bytes(text.encode("utf-8", "surrogatepass"), safe="")


@given(body=JOB)
def test_job_json(client, unlimited, body):
    _check(client.post("/v1/jobs", data=_dumps(body), content_type="application/json", headers=unlimited.headers))


@given(defaults=JOB, items=st.lists(JOB | VALUES, min_size=0, max_size=3))
def test_batch_json(client, unlimited, defaults, items):
    body = {**{k: v for k, v in defaults.items() if k not in ("image_base64",)}, "items": items}
    _check(client.post("/v1/batches", data=_dumps(body), content_type="application/json",
                       headers=unlimited.headers))


@given(fields=st.lists(st.tuples(st.sampled_from(["prompts", "metadata", "threshold", "webhook_events",
                                                  "webhook_url"]) | UTF8_TEXT, UTF8_TEXT), max_size=5),
       filename=UTF8_TEXT, file_text=UTF8_TEXT, kind=st.sampled_from(["job", "csv", "jsonl"]))
def test_multipart(client, unlimited, fields, filename, file_text, kind):
    data: dict = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    if kind == "job":
        data["image"] = (io.BytesIO(_IMAGE), filename or "x.jpg")
        path = "/v1/jobs"
    else:
        data["items"] = (io.BytesIO(("image_url,sku\n" if kind == "csv" else "") .encode() + file_text.encode()),
                         f"items.{kind}")
        path = "/v1/batches"
    _check(client.post(path, data=data, content_type="multipart/form-data", headers=unlimited.headers))


@given(ident=ANY_TEXT, query=st.dictionaries(st.sampled_from(["status", "limit", "cursor", "batch_id", "job_id"]),
                                             ANY_TEXT, max_size=3))
def test_reads_and_cancels(client, unlimited, ident, query):
    qs = "&".join(f"{k}={_path(v)}" for k, v in query.items())
    for method, path in (("GET", f"/v1/jobs/{_path(ident)}"), ("POST", f"/v1/jobs/{_path(ident)}/cancel"),
                         ("GET", f"/v1/jobs?{qs}"), ("GET", f"/v1/batches/{_path(ident)}/jobs?{qs}"),
                         ("POST", f"/v1/batches/{_path(ident)}/cancel"), ("GET", f"/v1/webhook-deliveries?{qs}"),
                         ("POST", f"/v1/webhook-deliveries/{_path(ident)}/retry")):
        _check(client.open(path, method=method, headers=unlimited.headers))


@given(key=st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=300))
def test_idempotency_keys(client, unlimited, key):
    _check(client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["a"]},
                       headers={**unlimited.headers, "Idempotency-Key": key}))
