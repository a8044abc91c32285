"""The reconciler against a real Redis and worker: a backlog is not re-enqueued (no flood), a lost
queue is, and every job still runs exactly once."""

from __future__ import annotations

import time
import uuid

import redis
from sqlalchemy import select

from api import create_app
from shared.db import make_engine, make_session_factory, session_scope
from shared.queue import make_celery
from shared.reconcile import reconcile_from_settings
from shared.scheduler import dispatcher_from_settings
from shared.tables import Job
from shared.tenants import create_tenant
from tests.support.images import make_image
from tests.support.services import private_queues, start_worker, stop_process

ITEMS = 300
PER_RUN = 100  # the reconciler's bound per run (reconcile_batch), so recovering the queue takes 3 runs
THRESHOLD_S = 5.0


def test_a_backlog_is_not_flooded_and_a_deleted_queue_is_recovered_exactly_once(
        settings, storage, own_database, image_server, tmp_path, capsys):
    suffix = f"rec-{uuid.uuid4().hex[:6]}"
    # A database of its own: the reconciler compares every queued job with what the broker holds,
    # and the session's database holds other tests' jobs, queued for queues nobody serves.
    own = private_queues(settings, suffix, database_url=own_database, reconcile_queued_after_s=THRESHOLD_S,
                         reconcile_batch=PER_RUN, max_batch_images=32)
    sessions = make_session_factory(make_engine(own_database, pool_size=2))
    with session_scope(sessions) as session:
        api_key = create_tenant(session, name=suffix).api_key
    headers = {"Authorization": f"Bearer {api_key}"}
    client = create_app(own).test_client()
    celery = make_celery(own)
    broker = redis.Redis.from_url(own.redis_url)
    bulk = own.redis_key_prefix + own.bulk_queue
    url = image_server.add(f"/{suffix}.jpg", make_image(32, 24))
    batch = client.post("/v1/batches", json={"prompts": ["shirt"], "items": [{"image_url": url}] * ITEMS},
                        headers=headers)
    assert batch.status_code == 202
    batch_id = batch.get_json()["id"]
    # the dispatcher sends every item at once (a lane as deep as the batch): the broker holds them all
    feeder = dispatcher_from_settings(own.model_copy(update={"dispatch_depth": ITEMS}), sessions=sessions,
                                      celery=celery)
    while feeder.tick().sent:
        pass
    assert broker.llen(bulk) == ITEMS

    def reconcile_and_measure() -> int:
        reconcile_from_settings(own, sessions=sessions, celery=celery)
        return int(broker.llen(bulk))

    # No worker: every job is older than the threshold after 5 s; runs for three times that add nothing.
    lengths = []
    deadline = time.monotonic() + 3 * THRESHOLD_S
    while time.monotonic() < deadline:
        lengths.append(reconcile_and_measure())
        time.sleep(2)
    assert max(lengths) == ITEMS, lengths

    broker.delete(bulk)  # what FLUSHALL or a restart without persistence does to the queue
    lengths = [reconcile_and_measure() for _ in range(ITEMS // PER_RUN + 1)]  # each run re-enqueues its bound
    assert lengths == [PER_RUN * (i + 1) for i in range(ITEMS // PER_RUN)] + [ITEMS], lengths

    worker = start_worker(own, tmp_path / "worker.log", name=f"{suffix}@drain")
    try:
        deadline = time.monotonic() + 240
        while (counts := client.get(f"/v1/batches/{batch_id}", headers=headers).get_json()["counts"]
               )["succeeded"] < ITEMS:
            assert time.monotonic() < deadline, counts
            lengths.append(reconcile_and_measure())
            time.sleep(2)
    finally:
        stop_process(worker)
    assert max(lengths) <= ITEMS, lengths
    with sessions() as session:
        attempts = session.execute(select(Job.attempts).where(Job.batch_id == batch_id)).scalars().all()
    assert len(attempts) == ITEMS and set(attempts) == {1}, sorted(set(attempts))  # each taken exactly once
    with capsys.disabled():
        print(f"\n[reconciler] bulk queue length while waiting: max {ITEMS}; while draining: {lengths}")
