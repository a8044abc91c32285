"""Talking to the API in tests: a tenant's credentials, waiting for a job, inserting rows directly."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from shared.clock import utcnow
from shared.db import session_scope
from shared.enums import FINISHED_JOB
from shared.tables import Job


@dataclass
class TestTenant:
    tenant_id: str
    api_key: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}



def wait_for_job(client: Any, tenant: TestTenant, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
        if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def insert_job(sessions: Any, tenant: TestTenant, *, status: str = "queued", created_at: Any = None,
               batch_id: str | None = None, results: list[dict[str, Any]] | None = None) -> str:
    """A job row written directly (no message on the queue), to control its state exactly."""
    job_id = str(uuid.uuid4())
    with session_scope(sessions) as session:
        session.add(Job(
            id=job_id, tenant_id=tenant.tenant_id, status=status, input={"image_url": "https://x.test/a.jpg"},
            prompts=["shirt"], threshold=0.4, results=results or [], metadata_={}, batch_id=batch_id,
            created_at=created_at or utcnow(),
            finished_at=utcnow() if status in FINISHED_JOB else None,
        ))
    return job_id
