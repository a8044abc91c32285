"""Faults in the follow-ups of finished jobs: object storage or Postgres gone while a batch is
finalized, a worker killed while it sends a webhook. Each ends with nothing lost, nothing twice
and no event under a second id."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from api import create_app
from shared.batches import finalize, stale_batches
from shared.db import make_engine, make_session_factory, session_scope
from shared.errors import StorageFailed
from shared.storage import ObjectStorage
from shared.tables import Batch, Job, WebhookDelivery
from tests.support.faults import kill, start_postgres_proxy
from tests.support.images import make_image
from tests.support.services import free_port, pg_address, private_queues, start_worker, stop_process
from tests.support.webhook_receiver import Receiver


def finished_batch(sessions, tenant, receiver: Receiver) -> str:
    """A batch whose two jobs finished but which nobody finalized yet (the state finalize starts from)."""
    batch_id = f"batch_{uuid.uuid4().hex}"
    created = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    with session_scope(sessions) as session:
        session.add(Batch(id=batch_id, tenant_id=tenant.tenant_id, status="running", created_at=created, total=2,
                          metadata_={}, webhook_url=receiver.url(f"/{batch_id}")))
        session.flush()
        for status in ("succeeded", "failed"):
            session.add(Job(id=str(uuid.uuid4()), tenant_id=tenant.tenant_id, status=status, created_at=created,
                            input={"image_url": "https://x.test/a.jpg"}, prompts=["a"], threshold=0.4,
                            metadata_={}, results=[], batch_id=batch_id, finished_at=created))
    return batch_id


def state(sessions, batch_id: str) -> tuple[str, str | None, int]:
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        deliveries = session.scalar(select(func.count()).select_from(WebhookDelivery)
                                    .where(WebhookDelivery.batch_id == batch_id))
        return batch.status, batch.results_key, int(deliveries or 0)


@pytest.fixture()
def receiver():
    rec = Receiver().start()
    yield rec
    rec.httpd.shutdown()


def test_storage_unreachable_while_the_manifest_is_written(settings, sessions, storage, tenant, receiver):
    batch_id = finished_batch(sessions, tenant, receiver)
    gone = ObjectStorage(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                     "s3_max_attempts": 1, "s3_connect_timeout_s": 1}))
    with pytest.raises(StorageFailed):
        finalize(sessions, gone, batch_id)
    assert state(sessions, batch_id) == ("running", None, 0)  # nothing half-done
    with sessions() as session:
        assert batch_id in stale_batches(session, older_than=dt.timedelta(0))  # the reconciler will ask again

    delivery = finalize(sessions, storage, batch_id)  # storage is back
    status, key, deliveries = state(sessions, batch_id)
    assert (status, deliveries) == ("completed", 1) and delivery is not None
    assert storage.get(key).count(b"\n") == 2
    assert finalize(sessions, storage, batch_id) is None  # exactly once


def test_postgres_unreachable_between_the_manifest_and_the_completion(settings, sessions, storage, tenant, receiver):
    batch_id = finished_batch(sessions, tenant, receiver)
    port = free_port()
    proxy = start_postgres_proxy(port)
    via_proxy = make_session_factory(make_engine(settings.database_url.replace(pg_address(), f"127.0.0.1:{port}"),
                                                 pool_size=1))

    class PostgresDiesAfterThePut:  # the fault: the database goes away right after the manifest is stored
        def __getattr__(self, name):
            return getattr(storage, name)

        def put_stream(self, key, chunks, **kwargs):  # how the manifest is written
            size = storage.put_stream(key, chunks, **kwargs)
            kill(proxy)
            return size

    try:
        with pytest.raises(OperationalError):
            finalize(via_proxy, PostgresDiesAfterThePut(), batch_id)  # type: ignore[arg-type]
        assert state(sessions, batch_id) == ("running", None, 0)  # not completed, no event

        proxy = start_postgres_proxy(port)  # back
        via_proxy = make_session_factory(make_engine(
            settings.database_url.replace(pg_address(), f"127.0.0.1:{port}"), pool_size=1))
        assert finalize(via_proxy, storage, batch_id) is not None
        assert state(sessions, batch_id)[::2] == ("completed", 1)
        assert finalize(via_proxy, storage, batch_id) is None
    finally:
        kill(proxy)


def test_worker_killed_while_sending_a_webhook_it_is_sent_again_under_the_same_id(
        settings, storage, make_tenant, image_server, sessions, tmp_path, receiver):
    suffix = f"whkill-{uuid.uuid4().hex[:6]}"
    own = private_queues(settings, suffix, webhook_claim_s=3.0, webhook_timeout_s=30.0,
                         webhook_dispatch_interval_s=0.5)
    tenant = make_tenant()
    client = create_app(own).test_client()
    hook = receiver.url(f"/{suffix}")
    receiver.delays[f"/{suffix}"] = [60.0]  # the first send hangs until its worker is killed
    first = start_worker(own, tmp_path / "a.log", name=f"{suffix}-a")
    second = None
    try:
        job = client.post("/v1/jobs", json={"image_url": image_server.add(f"/{suffix}.jpg", make_image(20, 20)),
                                            "prompts": ["a"], "webhook_url": hook}, headers=tenant.headers).get_json()
        receiver.wait(f"/{suffix}", 1, timeout=60)  # the event is on its way...
        os.killpg(first.pid, signal.SIGKILL)  # ...and its sender dies mid-request
        first.wait()

        second = start_worker(own, tmp_path / "b.log", name=f"{suffix}-b", beat=True)  # beat: the dispatcher
        received = receiver.wait(f"/{suffix}", 2, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            with sessions() as session:
                rows = session.execute(select(WebhookDelivery)
                                       .where(WebhookDelivery.job_id == job["id"])).scalars().all()
            if rows and rows[0].status == "succeeded" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(rows) == 1 and rows[0].status == "succeeded"
        assert {r.headers["webhook-id"] for r in received} == {rows[0].id}  # sent twice, one id
        assert len({r.body for r in received}) == 1  # the same bytes
    finally:
        if second is not None:
            stop_process(second)
