"""GET /v1/webhook-deliveries: filters, keyset pagination, tenant isolation, bad cursors."""

from __future__ import annotations

from shared.db import session_scope
from shared.webhooks import new_delivery


def add(sessions, tenant, *, job_id: str, status: str = "pending") -> str:
    row = new_delivery(tenant_id=tenant.tenant_id, event_type="job.succeeded", url="https://hooks.example.com/x",
                       data={"id": job_id}, job_id=job_id)
    row.status = status
    with session_scope(sessions) as session:
        session.add(row)
    return row.id


def test_pages_filters_and_isolation(client, tenant, make_tenant, sessions):
    ids = [add(sessions, tenant, job_id=f"job-{i}", status="failed" if i == 1 else "pending") for i in range(3)]
    first = client.get("/v1/webhook-deliveries?limit=2", headers=tenant.headers).get_json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["next_cursor"]
    second = client.get(f"/v1/webhook-deliveries?limit=2&cursor={first['next_cursor']}",
                        headers=tenant.headers).get_json()
    assert [d["id"] for d in second["data"]] == [ids[0]] and second["next_cursor"] is None
    assert [d["id"] for d in client.get("/v1/webhook-deliveries?status=failed",
                                        headers=tenant.headers).get_json()["data"]] == [ids[1]]
    assert [d["job_id"] for d in client.get("/v1/webhook-deliveries?job_id=job-2",
                                            headers=tenant.headers).get_json()["data"]] == ["job-2"]
    assert client.get("/v1/webhook-deliveries", headers=make_tenant().headers).get_json()["data"] == []
    bad = client.get("/v1/webhook-deliveries?cursor=nonsense", headers=tenant.headers)
    assert bad.status_code == 400 and bad.get_json()["code"] == "invalid_cursor"
    wrong = client.get("/v1/webhook-deliveries?status=delivered", headers=tenant.headers)
    assert wrong.status_code == 422 and wrong.get_json()["code"] == "invalid_status"
