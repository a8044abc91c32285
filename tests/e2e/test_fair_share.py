"""Sharing the fleet between tenants, on real parts: two Celery worker processes (whose embedded
dispatchers elect one leader), Postgres, Redis, the API; and the dispatcher's faults: killed with
SIGKILL while it feeds, Redis emptied during a bulk run, two dispatchers feeding one lane at once.
Each ends with every job succeeded and taken exactly once."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, update

from api import create_app
from shared.db import make_engine, make_session_factory, session_scope
from shared.enums import JobStatus
from shared.queue import make_celery
from shared.reconcile import reconcile_from_settings
from shared.tables import Job, Tenant
from shared.tenants import create_tenant
from tests.support.images import make_image
from tests.support.services import ROOT, private_queues, settings_env, start_worker, stop_process


class Fleet:
    """A deployment of its own: private queues, Redis keys and database, its workers and tenants."""

    def __init__(self, settings, database_url: str, tmp_path: Path, **update: Any) -> None:
        suffix = f"fair-{uuid.uuid4().hex[:6]}"
        self.settings = private_queues(settings, suffix, database_url=database_url,
                                       redis_key_prefix=f"{settings.redis_key_prefix}{suffix}:",
                                       dispatch_depth=8, **update)
        self.sessions = make_session_factory(make_engine(database_url, pool_size=2))
        self.client = create_app(self.settings).test_client()
        self.tmp_path, self.suffix = tmp_path, suffix
        self.procs: list[subprocess.Popen] = []

    def tenant(self, **share: Any) -> dict[str, str]:
        with session_scope(self.sessions) as session:
            made = create_tenant(session, name=f"{self.suffix}-{len(self.procs)}")
            if share:
                session.execute(update(Tenant).where(Tenant.id == made.tenant_id).values(**share))
        return {"Authorization": f"Bearer {made.api_key}", "tenant_id": made.tenant_id}

    def batch(self, tenant: dict[str, str], url: str, items: int) -> str:
        resp = self.client.post("/v1/batches", json={"prompts": ["shirt"], "items": [{"image_url": url}] * items},
                                headers={"Authorization": tenant["Authorization"]})
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()["id"]

    def workers(self, count: int) -> None:
        for i in range(count):
            self.procs.append(start_worker(self.settings, self.tmp_path / f"worker{i}.log", name=f"{self.suffix}-{i}"))

    def dispatcher(self, name: str) -> subprocess.Popen:
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        log = open(self.tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dispatch"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def jobs(self, batch_id: str) -> list[Job]:
        with self.sessions() as session:
            return list(session.execute(select(Job).where(Job.batch_id == batch_id)).scalars())

    def wait(self, batch_ids: list[str], timeout: float = 240, during: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.sessions() as session:
                left = session.execute(select(func.count()).select_from(Job).where(
                    Job.batch_id.in_(batch_ids), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))).scalar_one()
            if not left:
                return
            assert time.monotonic() < deadline, f"{left} jobs unfinished"
            if during is not None:
                during()
            time.sleep(0.5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop_process(proc)
        client = redis.Redis.from_url(self.settings.redis_url)
        keys = list(client.scan_iter(match=f"{self.settings.redis_key_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture()
def fleet_of(settings, storage, own_database, tmp_path):
    made: list[Fleet] = []

    def make(**update: Any) -> Fleet:
        made.append(Fleet(settings, own_database, tmp_path, **update))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


@pytest.fixture()
def photo(image_server) -> str:
    return image_server.add(f"/fair-{uuid.uuid4().hex[:6]}.jpg", make_image(48, 64))


def succeeded_once(fleet: Fleet, batch_ids: list[str]) -> None:
    """What a user checks after any fault: every item succeeded, none was taken twice."""
    for batch_id in batch_ids:
        jobs = fleet.jobs(batch_id)
        assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}, Counter(j.status for j in jobs)
        assert {j.attempts for j in jobs} == {1}, Counter(j.attempts for j in jobs)


def test_two_workers_share_between_tenants_and_a_newcomer_is_not_held_hostage(fleet_of, photo, capsys):
    fleet = fleet_of()
    a, b, c = fleet.tenant(), fleet.tenant(), fleet.tenant()
    first = fleet.batch(a, photo, 150)  # a's catalog first; under FIFO b and c would wait for all of it
    second = fleet.batch(b, photo, 150)
    fleet.workers(2)
    time.sleep(1)  # the fleet is busy
    posted = dt.datetime.now(dt.UTC)
    late = fleet.batch(c, photo, 4)
    fleet.wait([late])
    fleet.wait([first, second])
    succeeded_once(fleet, [first, second, late])
    jobs = fleet.jobs(first) + fleet.jobs(second)
    order = sorted(jobs, key=lambda j: j.started_at)
    window = [j.tenant_id for j in order[:200]]  # both backlogged all along this window
    share = window.count(a["tenant_id"]) / len(window)
    assert share == pytest.approx(0.5, abs=0.1), share
    newcomer = fleet.jobs(late)
    first_start = (min(j.started_at for j in newcomer) - posted).total_seconds()
    c_done = max(j.finished_at for j in newcomer)
    left = sum(j.finished_at > c_done for j in jobs)
    assert first_start <= 5.0, first_start  # a few workers' slots, not a's and b's backlog
    assert left > 150, left  # c finished with most of a's and b's still to do
    with capsys.disabled():
        print(f"\n[fair share] a's share of the first 200 starts {share:.2f}; c's first item started "
              f"{first_start:.1f} s after its batch was posted, and its batch finished with {left} of a's and "
              f"b's 300 still to finish")


def test_max_running_holds_a_tenant_to_its_cap_and_cancel_sends_nothing_more(fleet_of, photo):
    fleet = fleet_of()
    capped, other = fleet.tenant(max_running=2), fleet.tenant()
    held = fleet.batch(capped, photo, 30)
    gone = fleet.batch(other, photo, 100)
    fleet.workers(2)
    peaks = []

    def sample() -> None:
        with fleet.sessions() as session:
            peaks.append(session.execute(select(func.count()).select_from(Job).where(
                Job.batch_id == held, Job.status == JobStatus.RUNNING)).scalar_one())

    deadline = time.monotonic() + 60
    while not any(j.status == JobStatus.SUCCEEDED for j in fleet.jobs(gone)):
        assert time.monotonic() < deadline
        sample()
        time.sleep(0.05)
    canceled = fleet.client.post(f"/v1/batches/{gone}/cancel", headers={"Authorization": other["Authorization"]})
    assert canceled.status_code == 200
    at = max(j.started_at for j in fleet.jobs(gone) if j.started_at)
    fleet.wait([held], during=sample)
    assert max(peaks) <= 2 and max(peaks) >= 1
    after = [j for j in fleet.jobs(gone) if j.started_at and j.started_at > at]
    assert after == []  # nothing of the canceled batch started after its cancel was answered
    succeeded_once(fleet, [held])


def test_a_dispatcher_killed_while_it_feeds_loses_nothing_and_runs_nothing_twice(fleet_of, photo):
    fleet = fleet_of(dispatcher="off", reconcile_queued_after_s=3.0)
    a, b = fleet.tenant(), fleet.tenant()
    batches = [fleet.batch(a, photo, 40), fleet.batch(b, photo, 40)]
    fleet.workers(1)
    feeder = fleet.dispatcher("first")
    deadline = time.monotonic() + 60
    while not any(j.status == JobStatus.SUCCEEDED for j in fleet.jobs(batches[0])):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    feeder.send_signal(signal.SIGKILL)  # mid-feed: between its commit and its push, perhaps
    feeder.wait()
    fleet.dispatcher("second")  # the standby takes over
    celery = make_celery(fleet.settings)
    fleet.wait(batches, during=lambda: reconcile_from_settings(fleet.settings, sessions=fleet.sessions,
                                                               celery=celery))
    succeeded_once(fleet, batches)


def test_redis_emptied_during_a_bulk_run_loses_nothing(fleet_of, photo):
    fleet = fleet_of(reconcile_queued_after_s=3.0)
    a = fleet.tenant()
    batches = [fleet.batch(a, photo, 50)]
    fleet.workers(1)
    deadline = time.monotonic() + 60
    while sum(j.status == JobStatus.SUCCEEDED for j in fleet.jobs(batches[0])) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client = redis.Redis.from_url(fleet.settings.redis_url)
    keys = list(client.scan_iter(match=f"{fleet.settings.redis_key_prefix}*"))
    client.delete(*keys)  # what FLUSHALL does to this deployment's keys (the queue, unacked messages)
    client.close()
    celery = make_celery(fleet.settings)
    fleet.wait(batches, during=lambda: reconcile_from_settings(fleet.settings, sessions=fleet.sessions,
                                                               celery=celery))
    succeeded_once(fleet, batches)


def test_two_dispatchers_feeding_one_lane_send_each_item_once(fleet_of, photo):
    fleet = fleet_of()  # both workers embed one (one leads), and a standalone one stands by
    a, b = fleet.tenant(), fleet.tenant()
    batches = [fleet.batch(a, photo, 30), fleet.batch(b, photo, 30)]
    fleet.dispatcher("standalone")
    fleet.workers(2)
    fleet.wait(batches)
    succeeded_once(fleet, batches)
