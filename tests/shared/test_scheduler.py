"""The bulk lane's dispatcher (shared/scheduler.py) on real Postgres and Redis, with an instant
stand-in for the workers: batches accepted through the API land as rows; what the dispatcher
pushes, in what order and how often, is what a fleet of workers would take."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from api import create_app
from shared.db import make_engine, make_session_factory, session_scope
from shared.enums import JobStatus
from shared.queue import BrokerView, make_celery, segment_job_id
from shared.scheduler import Dispatcher, DrainRate, LeaderLock, Share, Stride, dispatcher_from_settings, run
from shared.tables import Job, Tenant
from tests.support.services import private_queues

# ---- the plan alone ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("weights", "shares"), [({"a": 1, "b": 1}, {"a": 0.5, "b": 0.5}),
                                                  ({"a": 3, "b": 1}, {"a": 0.75, "b": 0.25}),
                                                  ({"a": 1, "b": 2, "c": 1}, {"a": 0.25, "b": 0.5, "c": 0.25})])
def test_the_plan_shares_slots_by_weight(weights, shares):
    stride = Stride()
    got: Counter[str] = Counter()
    for _ in range(50):  # ticks of 8 slots
        got.update(stride.plan(8, {t: Share(w) for t, w in weights.items()}))
    for tenant, share in shares.items():
        assert got[tenant] / 400 == pytest.approx(share, abs=0.01)


@pytest.mark.unit
def test_a_newcomer_is_served_next_and_gets_no_credit_for_its_idle_time():
    stride = Stride()
    for _ in range(100):
        stride.plan(10, {"a": Share()})  # a alone for 1,000 slots
    order = stride.plan(10, {"a": Share(), "b": Share()})
    assert order[:2].count("b") == 1 and Counter(order) == {"a": 5, "b": 5}  # at once, then only its share


@pytest.mark.unit
def test_a_tenant_at_its_cap_gets_no_slot_and_the_others_take_them():
    order = Stride().plan(10, {"a": Share(room=2), "b": Share(), "c": Share(room=0)})
    assert Counter(order) == {"a": 2, "b": 8}


@pytest.mark.unit
def test_the_lane_is_kept_as_deep_as_the_fleet_takes_in_the_horizon():
    rate = DrainRate()
    rate.saw(10, now=0.0)
    rate.pushed(20)  # 30 ready after that tick
    rate.saw(5, now=1.0)  # 25 taken in a second
    assert rate.per_s == pytest.approx(25)
    dispatcher = Dispatcher(sessions=None, lane="l", depth=32, ready=lambda: 0, push=lambda ids: None,  # type: ignore[arg-type]
                            horizon_s=0.5)
    for per_s, target in ((10, 32), (1000, 500), (1e6, 4096)):  # a slow fleet keeps the floor
        dispatcher.drain.per_s = per_s
        assert dispatcher.target() == target


# ---- on Postgres and Redis ----------------------------------------------------------------


class Lane:
    """A private bulk lane: an API that accepts batches onto it, a dispatcher, and an instant worker
    stand-in that takes what the dispatcher pushed (and can finish jobs, for max_running)."""

    def __init__(self, settings, sessions, *, depth: int = 10) -> None:
        # a fixed depth (no horizon): the stand-in fleet takes everything between ticks
        self.settings = private_queues(settings, f"fair-{uuid.uuid4().hex[:6]}", dispatch_depth=depth,
                                       dispatch_horizon_s=0)
        self.client = create_app(self.settings).test_client()
        self.sessions = sessions
        self.celery = make_celery(self.settings)
        self.dispatcher = dispatcher_from_settings(self.settings, sessions=sessions, celery=self.celery)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.key = self.settings.redis_key_prefix + self.settings.bulk_queue

    def batch(self, tenant, items: int, **fields: Any) -> str:
        body = {"items": [{"image_url": f"https://example.com/{i}.jpg"} for i in range(items)],
                "prompts": ["shirt"], **fields}
        resp = self.client.post("/v1/batches", json=body, headers=tenant.headers)
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()["id"]

    def take(self) -> list[str]:
        """Every job id the lane holds, in the order workers would take them (kombu BRPOPs)."""
        ids = []
        while (raw := self.redis.rpop(self.key)) is not None:
            import json

            ids.append(segment_job_id(json.loads(raw)))
        return ids

    def tenants_of(self, job_ids: list[str]) -> list[str]:
        with self.sessions() as session:
            owner = dict(session.execute(select(Job.id, Job.tenant_id).where(Job.id.in_(job_ids))).all())
        return [owner[j] for j in job_ids]

    def finish(self, job_ids: list[str]) -> None:
        with session_scope(self.sessions) as session:
            session.execute(update(Job).where(Job.id.in_(job_ids)).values(status=JobStatus.SUCCEEDED))

    def close(self) -> None:
        self.redis.delete(self.key)
        self.redis.close()


@pytest.fixture()
def lane(settings, sessions, storage):
    made = Lane(settings, sessions)
    yield made
    made.close()


def set_share(sessions, tenant, **values: Any) -> None:
    with session_scope(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == tenant.tenant_id).values(**values))


def started(lane: Lane, ticks: int) -> list[str]:
    """Job ids in the order an instant fleet starts them, over `ticks` ticks."""
    order = []
    for _ in range(ticks):
        lane.dispatcher.tick()
        order += lane.take()
    return order


def test_accepting_a_batch_sends_nothing_until_the_dispatcher_has_room(lane, make_tenant):
    lane.batch(make_tenant(), 50)
    assert lane.redis.llen(lane.key) == 0  # rows only
    lane.dispatcher.tick()
    assert lane.redis.llen(lane.key) == 10  # the lane's depth
    lane.dispatcher.tick()
    assert lane.redis.llen(lane.key) == 10  # full: nothing more until workers take some


@pytest.mark.parametrize(("weights", "goal"), [((1, 1), 0.5), ((3, 1), 0.75)])
def test_two_backlogged_tenants_start_jobs_in_proportion_to_their_weights(lane, make_tenant, sessions, weights, goal):
    a, b = make_tenant(), make_tenant()
    set_share(sessions, a, weight=weights[0])
    set_share(sessions, b, weight=weights[1])
    lane.batch(a, 300)  # a's backlog first: under FIFO b would wait for all of it
    lane.batch(b, 300)
    window = lane.tenants_of(started(lane, 12))  # 120 starts while both are backlogged
    assert len(window) == 120
    assert window.count(a.tenant_id) / 120 == pytest.approx(goal, abs=0.1)


def test_three_tenants_share_and_a_newcomers_first_item_goes_out_in_the_next_tick(lane, make_tenant):
    a, b, c = make_tenant(), make_tenant(), make_tenant()
    lane.batch(a, 400)
    lane.batch(b, 400)
    started(lane, 5)  # the fleet is busy with a and b
    lane.batch(c, 3)
    first = lane.tenants_of(started(lane, 1))  # 10 slots, a third each: c's three all go out now
    assert c.tenant_id in first[:3] and first.count(c.tenant_id) == 3
    counts = Counter(lane.tenants_of(started(lane, 9)))
    assert c.tenant_id not in counts and abs(counts[a.tenant_id] - counts[b.tenant_id]) <= 2


def test_within_a_tenant_a_high_priority_batch_goes_first(lane, make_tenant):
    a = make_tenant()
    normal = lane.batch(a, 30)
    high = lane.batch(a, 15, priority="high")
    low = lane.batch(a, 5, priority="low")
    resp = lane.client.get(f"/v1/batches/{high}", headers=a.headers).get_json()
    assert resp["priority"] == "high"
    order = started(lane, 5)
    with lane.sessions() as session:
        batch_of = dict(session.execute(select(Job.id, Job.batch_id).where(Job.id.in_(order))).all())
    batches = [batch_of[j] for j in order]
    assert batches == [high] * 15 + [normal] * 30 + [low] * 5
    with lane.sessions() as session:  # and within a batch, the items' own order
        created = [session.get(Job, j).created_at for j in order[:15]]
    assert created == sorted(created)


def test_max_running_caps_a_tenant_and_its_room_comes_back_as_jobs_finish(lane, make_tenant, sessions):
    a, b = make_tenant(), make_tenant()
    set_share(sessions, a, max_running=3)
    lane.batch(a, 20)
    lane.batch(b, 20)
    first = lane.tenants_of(ids := started(lane, 1))
    assert first.count(a.tenant_id) == 3 and first.count(b.tenant_id) == 7
    assert lane.tenants_of(started(lane, 1)).count(a.tenant_id) == 0  # a's three still unfinished
    lane.finish([j for j, t in zip(ids, first, strict=True) if t == a.tenant_id][:2])
    assert lane.tenants_of(started(lane, 1)).count(a.tenant_id) == 2


def test_a_canceled_batch_sends_nothing_to_any_worker(lane, make_tenant):
    a = make_tenant()
    gone = lane.batch(a, 40)
    kept = lane.batch(a, 5)
    assert lane.client.post(f"/v1/batches/{gone}/cancel", headers=a.headers).status_code == 200
    order = started(lane, 6)
    with lane.sessions() as session:
        batches = {b for (b,) in session.execute(select(Job.batch_id).where(Job.id.in_(order)))}
    assert batches == {kept} and len(order) == 5


def test_two_dispatchers_at_once_never_send_an_item_twice(lane, make_tenant, settings):
    a, b = make_tenant(), make_tenant()
    lane.batch(a, 150)
    lane.batch(b, 150)
    lane.dispatcher.depth = 10_000  # room for everything: both race for the same rows
    engine = make_engine(settings.database_url, pool_size=2)
    other = Dispatcher(sessions=make_session_factory(engine), lane=lane.settings.bulk_queue, depth=10_000,
                       ready=lambda: 0, push=lane.dispatcher.push)
    barrier = threading.Barrier(2)

    def feed(dispatcher):
        barrier.wait()
        while dispatcher.tick().sent:
            pass

    threads = [threading.Thread(target=feed, args=(d,)) for d in (lane.dispatcher, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pushed = lane.take()
    assert len(pushed) == 300 and len(set(pushed)) == 300
    engine.dispose()


def test_only_one_dispatcher_leads_a_lane_and_another_takes_over_when_it_dies(lane, settings):
    engines = [make_engine(settings.database_url, pool_size=1) for _ in range(2)]
    name = f"clipmask.dispatch:{lane.settings.bulk_queue}"
    first, second = LeaderLock(engines[0], name), LeaderLock(engines[1], name)
    assert first.acquire() and not second.acquire()
    assert first.acquire()  # still ours
    first.release()  # its connection closes, as a killed process's does
    assert second.acquire()
    second.release()
    for engine in engines:
        engine.dispose()


def test_redis_refusing_the_push_leaves_the_items_waiting(lane, make_tenant):
    a = make_tenant()
    lane.batch(a, 5)

    def refuse(ids):
        raise redis.ConnectionError("down")

    lane.dispatcher.push = refuse
    with pytest.raises(redis.ConnectionError):
        lane.dispatcher.tick()
    with lane.sessions() as session:
        waiting = session.execute(select(Job.dispatched_at).where(Job.tenant_id == a.tenant_id)).scalars().all()
    assert waiting == [None] * 5


def test_the_run_loop_feeds_the_lane_and_stops(lane, make_tenant, settings):
    a = make_tenant()
    lane.batch(a, 25)
    stop = threading.Event()
    engine = make_engine(settings.database_url, pool_size=1)
    lock = LeaderLock(engine, f"clipmask.dispatch:{lane.settings.bulk_queue}")
    thread = threading.Thread(target=run, args=(lane.dispatcher, lock), kwargs={"stop": stop, "interval_s": 0.01})
    thread.start()
    taken: list[str] = []
    for _ in range(300):
        taken += lane.take()
        if len(taken) == 25:
            break
        stop.wait(0.02)
    stop.set()
    thread.join(10)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 25
    engine.dispose()


def test_the_metrics_give_each_tenants_queued_and_running_items(lane, make_tenant):
    a = make_tenant()
    lane.batch(a, 12)
    ids = started(lane, 1)
    with session_scope(lane.sessions) as session:
        session.execute(update(Job).where(Job.id.in_(ids[:4])).values(status=JobStatus.RUNNING))
    text = lane.client.get("/metrics").get_data(as_text=True)
    assert f'clipmask_tenant_queued{{tenant="{a.tenant_id}"}} 8.0' in text
    assert f'clipmask_tenant_running{{tenant="{a.tenant_id}"}} 4.0' in text


def test_broker_view_counts_ready_messages(lane, make_tenant):
    lane.batch(make_tenant(), 7)
    lane.dispatcher.tick()
    view = BrokerView(lane.settings, unacked_within_s=0)
    assert view.ready(lane.settings.bulk_queue) == 7
    view.close()
