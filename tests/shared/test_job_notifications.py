"""A job announces its final state itself (migration 0010's trigger): what `Prefer: wait` and the
workers' cancel listener hear, for each way a job changes, and nothing for a transaction rolled back."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from shared import jobs as jobstate
from shared.db import session_scope
from shared.jobs import JOB_CANCELED_CHANNEL, JOB_FINISHED_CHANNEL
from shared.tables import Job


@pytest.fixture()
def heard(database_url):
    """LISTENs on both channels; the returned function gives what arrived since the last call about
    the given jobs (the session's database is shared: other tests' jobs finish meanwhile too)."""
    conn = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    conn.execute(f"LISTEN {JOB_FINISHED_CHANNEL}")
    conn.execute(f"LISTEN {JOB_CANCELED_CHANNEL}")

    def drain(ids: list[str]) -> list[tuple[str, str]]:
        conn.execute("SELECT 1")  # a round trip: notifications committed before it are in by now
        return sorted((n.channel, n.payload) for n in conn.notifies(timeout=0.2) if n.payload in ids)

    yield drain
    conn.close()


def new_job(sessions, tenant, status: str = "queued") -> str:
    job_id = str(uuid.uuid4())
    with session_scope(sessions) as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant_id, status=status, input={"image_url": "http://x/y.jpg"},
                        prompts=["shirt"], threshold=0.4, results=[], metadata_={}))
    return job_id


def test_each_final_state_is_announced_once_and_cancels_also_to_the_workers(sessions, storage, tenant, heard):
    done, failed, canceled = ids = [new_job(sessions, tenant) for _ in range(3)]
    heard(ids)
    with session_scope(sessions) as session:
        for job_id in (done, failed):
            assert jobstate.mark_running(session, job_id, model_id="m", lease_s=60) is not None
    assert heard(ids) == []  # queued -> running is not final
    with session_scope(sessions) as session:
        assert jobstate.renew_leases(session, [done, failed], lease_s=60) == 2
    assert heard(ids) == []  # a lease renewal changes no status
    with session_scope(sessions) as session:
        assert jobstate.mark_succeeded(session, done, results=[], storage=storage) is not None
        assert jobstate.mark_failed(session, failed, code="image_invalid", message="no", storage=storage) is not None
        assert jobstate.cancel(session, canceled, storage=storage) is not None
    assert heard(ids) == sorted([(JOB_FINISHED_CHANNEL, done), (JOB_FINISHED_CHANNEL, failed),
                              (JOB_FINISHED_CHANNEL, canceled), (JOB_CANCELED_CHANNEL, canceled)])
    with session_scope(sessions) as session:  # already final: the conditional UPDATE changes nothing
        assert jobstate.cancel(session, done, storage=storage) is None
    assert heard(ids) == []


def test_a_batch_cancel_announces_every_job_it_stopped(sessions, storage, tenant, heard):
    batch_id = f"bat_{uuid.uuid4().hex}"
    ids = [new_job(sessions, tenant) for _ in range(3)]
    with session_scope(sessions) as session:
        session.query(Job).filter(Job.id.in_(ids)).update({"batch_id": batch_id}, synchronize_session=False)
    heard(ids)
    with session_scope(sessions) as session:
        assert len(jobstate.cancel_batch_jobs(session, batch_id=batch_id, tenant_id=tenant.tenant_id,
                                              storage=storage)) == 3
    assert heard(ids) == sorted([(c, i) for i in ids for c in (JOB_FINISHED_CHANNEL, JOB_CANCELED_CHANNEL)])


def test_nothing_is_announced_for_a_finish_that_was_rolled_back(sessions, storage, tenant, heard):
    job_id = new_job(sessions, tenant)
    heard([job_id])
    with sessions() as session:
        assert jobstate.cancel(session, job_id, storage=storage) is not None
        session.rollback()
    assert heard([job_id]) == []
    with sessions() as session:
        assert session.get(Job, job_id).status == "queued"
