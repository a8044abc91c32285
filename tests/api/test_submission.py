"""The submission service seen through the API: same-key races for jobs and batches, the cap."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from shared.db import session_scope
from shared.tables import Batch, Job, Tenant


def _race(app: Any, n: int, send: Callable[[Any], Any]) -> list[Any]:
    """`n` threads, each with its own client, released at once; their responses."""
    barrier = threading.Barrier(n)
    answers: list[Any] = [None] * n

    def run(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        answers[i] = send(client)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_concurrent_batches_with_one_key_make_one_batch_and_one_answer(app, tenant, sessions):
    key = f"catalog-{uuid.uuid4().hex}"
    body = {"prompts": ["shirt"], "items": [{"image_url": f"https://example.com/{i}.jpg"} for i in range(50)]}
    answers = _race(app, 8, lambda c: c.post("/v1/batches", json=body,
                                             headers={**tenant.headers, "Idempotency-Key": key}))
    assert [a.status_code for a in answers] == [202] * 8, [a.get_json() for a in answers]
    assert len({a.get_json()["id"] for a in answers}) == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Batch).where(Batch.tenant_id == tenant.tenant_id)) == 1
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.tenant_id)) == 50


def test_concurrent_jobs_with_one_key_make_one_job(app, tenant, sessions):
    key = f"sku-{uuid.uuid4().hex}"
    body = {"image_url": "https://example.com/a.jpg", "prompts": ["dress"]}
    answers = _race(app, 8, lambda c: c.post("/v1/jobs", json=body, headers={**tenant.headers, "Idempotency-Key": key}))
    assert [a.status_code for a in answers] == [202] * 8
    assert len({a.get_json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 7
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.tenant_id)) == 1


def test_a_queued_jobs_limit_of_zero_means_zero(client, tenant, sessions):
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).max_queued_jobs = 0
    resp = client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "prompts": ["x"]},
                       headers=tenant.headers)
    assert resp.status_code == 429 and resp.get_json()["code"] == "too_many_queued_jobs"
    assert resp.headers["Retry-After"]


def test_the_cap_holds_under_concurrent_creates(app, tenant, sessions):
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).max_queued_jobs = 10
    body = {"image_url": "https://example.com/a.jpg", "prompts": ["x"]}
    answers = _race(app, 20, lambda c: c.post("/v1/jobs", json=body, headers=tenant.headers))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 10 + [429] * 10, codes
    assert {a.get_json()["code"] for a in answers if a.status_code == 429} == {"too_many_queued_jobs"}
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.tenant_id)) == 10
