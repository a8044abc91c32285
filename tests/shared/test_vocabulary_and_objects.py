"""The job state machine's edges, what transitions return, the presenters and the log format:
pure code, no services (`make test-unit`)."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from shared.clock import isoformat
from shared.enums import FINISHED_JOB, JobEvent, JobStatus
from shared.followups import Effects
from shared.jobs import ALLOWED_FROM, Finished
from shared.present import batch_counts, job_object
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.tables import Job

pytestmark = pytest.mark.unit


def test_the_state_machine_has_exactly_the_contracts_edges():
    edges = {(source, target) for target, sources in ALLOWED_FROM.items() for source in sources}
    # the contract's Jobs section: queued -> running, canceled; running -> succeeded, failed, canceled, queued
    contract = {
        (JobStatus.QUEUED, JobStatus.RUNNING), (JobStatus.QUEUED, JobStatus.CANCELED),
        (JobStatus.RUNNING, JobStatus.SUCCEEDED), (JobStatus.RUNNING, JobStatus.FAILED),
        (JobStatus.RUNNING, JobStatus.CANCELED), (JobStatus.RUNNING, JobStatus.QUEUED),
    }
    # two more on purpose: a redelivered message re-runs a running job (running -> running, under
    # the lease rule), and a job whose row can't even start fails from queued
    assert edges == contract | {(JobStatus.RUNNING, JobStatus.RUNNING), (JobStatus.QUEUED, JobStatus.FAILED)}
    assert not any(source in FINISHED_JOB for source, _ in edges)  # nothing leaves a final state


def test_each_final_status_sends_its_event_and_others_none():
    assert {s: JobEvent.for_status(s) for s in JobStatus} == {
        JobStatus.QUEUED: None, JobStatus.RUNNING: None, JobStatus.SUCCEEDED: JobEvent.SUCCEEDED,
        JobStatus.FAILED: JobEvent.FAILED, JobStatus.CANCELED: JobEvent.CANCELED,
    }
    assert JobEvent.for_status("succeeded") is JobEvent.SUCCEEDED  # rows hold plain strings


def _job(status: JobStatus, batch_id: str | None = None, **extra: object) -> Job:
    fields: dict[str, object] = {"results": [], **extra}
    return Job(id="j1", tenant_id="t1", status=status, created_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678000, dt.UTC),
               input={"image_url": "https://x.test/a.jpg"}, prompts=["shirt"], threshold=0.4,
               metadata_={"sku": "1"}, batch_id=batch_id, attempts=1, **fields)


def test_effects_collect_deliveries_and_each_batch_once():
    done = [Finished(_job(JobStatus.SUCCEEDED, "b1"), ("d1",)), None, Finished(_job(JobStatus.FAILED, "b1"), ("d2",)),
            Finished(_job(JobStatus.CANCELED))]
    effects = Effects.of(done, delivery_ids=["d0"], batch_ids=["b2"])
    assert effects == Effects(("d0", "d1", "d2"), ("b2", "b1"))
    assert not Effects.of([Finished(_job(JobStatus.SUCCEEDED))])  # nothing to follow up


@pytest.fixture()
def offline_storage() -> ObjectStorage:
    """Presigning is local arithmetic: this storage never connects anywhere."""
    return ObjectStorage(Settings(s3_endpoint_url="http://127.0.0.1:9", s3_access_key_id="k",
                                  s3_secret_access_key="s", s3_bucket="b"))


def test_job_object_shows_results_only_once_succeeded(offline_storage):
    results = [{"prompt": "shirt", "mask_key": "masks/t1/j1/0.png", "bbox": [1, 2, 3, 4], "area_fraction": 0.5,
                "score": 0.9}]
    running = job_object(_job(JobStatus.RUNNING, results=results), offline_storage)
    assert running["results"] == [] and running["error"] is None and running["attempts"] == 1
    assert running["created_at"] == "2026-01-02T03:04:05.678Z"
    done = job_object(_job(JobStatus.SUCCEEDED, results=results, image_width=8, image_height=6), offline_storage)
    assert done["image"] == {"width": 8, "height": 6}
    assert done["results"][0]["mask_url"].startswith("http://127.0.0.1:9/b/masks/t1/j1/0.png?")
    assert "mask_key" not in done["results"][0]


def test_batch_counts_name_every_status():
    assert batch_counts(5, {"queued": 2, "succeeded": 3}) == {
        "total": 5, "queued": 2, "running": 0, "succeeded": 3, "failed": 0, "canceled": 0}


def test_times_are_iso_utc_with_a_z():
    cet = dt.timezone(dt.timedelta(hours=1))
    assert isoformat(dt.datetime(2026, 11, 21, 10, 30, tzinfo=cet)) == "2026-11-21T09:30:00.000Z"
    assert isoformat(None) is None


def test_json_log_format_has_the_context_fields():
    from shared.logs import JsonFormatter

    record = logging.LogRecord("worker.runner", logging.INFO, __file__, 1, "job succeeded", None, None)
    record.job_id, record.tenant_id, record.duration_ms = "j1", "t1", 12
    line = json.loads(JsonFormatter().format(record))
    assert line["job_id"] == "j1" and line["tenant_id"] == "t1" and line["duration_ms"] == 12
    assert line["level"] == "INFO" and line["msg"] == "job succeeded" and line["ts"].endswith("Z")
