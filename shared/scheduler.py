"""The bulk lane's dispatcher: batch items wait in Postgres and are sent to workers as slots free,
shared between tenants by weight.

Accepting a batch writes its rows only (`dispatched_at` null, `lane` its bulk queue). Whenever
the lane's Redis list holds fewer than `depth` ready messages, a tick:
1. finds the tenants with items waiting (a loose index scan of ix_jobs_undispatched: one probe
   per tenant, whatever their backlog);
2. plans the free slots by stride scheduling (weighted fair queueing): each tenant has a pass
   that grows by 1/weight per item sent, the tenant with the lowest pass is served next, and a
   tenant that joins (or comes back) starts at the lane's virtual time, the pass of the last
   item sent: its first item goes out within the next tick, and it cannot claim credit for the
   time it had nothing queued. A tenant at its `max_running` (items sent and not finished) is
   skipped until one finishes;
3. takes each tenant's next items (batch priority high > normal > low, then oldest batch, then
   the batch's own order) FOR UPDATE SKIP LOCKED, marks them dispatched and commits;
4. LPUSHes their ids onto the lane, interleaved in the planned order. If Redis refuses, the
   marks are taken back; if the process dies between the commit and the push, the reconciler
   finds dispatched jobs the broker does not hold and enqueues them again.
The order of who waits is decided when capacity frees, not when a batch is accepted. A canceled
item is no longer `queued` and is never sent. Several dispatchers may run (one per worker
process by default, `CLIPMASK_DISPATCHER=embedded`): a session advisory lock per lane makes one
of them the leader and the others wait to take over; the row locks alone already keep two from
sending one item twice.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.enums import JobStatus
from shared.tables import Job

log = logging.getLogger(__name__)

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
DEFAULT_WEIGHT = 1

# the tenants with items waiting on a lane: one probe of ix_jobs_undispatched per tenant (a loose
# index scan), whatever their backlog
_WAITING_TENANTS = text("""
WITH RECURSIVE t(tenant_id) AS (
    (SELECT tenant_id FROM jobs
     WHERE lane = :lane AND dispatched_at IS NULL AND status = 'queued' AND batch_id IS NOT NULL
     ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.tenant_id FROM jobs j
            WHERE j.lane = :lane AND j.dispatched_at IS NULL AND j.status = 'queued' AND j.batch_id IS NOT NULL
              AND j.tenant_id > t.tenant_id
            ORDER BY j.tenant_id LIMIT 1)
    FROM t WHERE t.tenant_id IS NOT NULL
)
SELECT t.tenant_id, tenants.weight, tenants.max_running FROM t JOIN tenants ON tenants.id = t.tenant_id
""")
# each planned tenant's next `k` waiting items marked dispatched, in one statement; rows another
# dispatcher holds are skipped (the caller sorts what comes back into the lane's order)
_TAKE = text("""
UPDATE jobs SET dispatched_at = now(), enqueued_at = now()
WHERE id IN (
    SELECT next.id FROM unnest(CAST(:tenants AS text[]), CAST(:counts AS int[])) AS p(tenant_id, k)
    CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE lane = :lane AND tenant_id = p.tenant_id AND dispatched_at IS NULL AND status = 'queued'
          AND batch_id IS NOT NULL
        ORDER BY priority DESC, created_at, id LIMIT p.k
        FOR UPDATE SKIP LOCKED) AS next)
RETURNING id, tenant_id, priority, created_at
""")


@dataclass
class Share:
    """One tenant as a tick sees it."""

    weight: int = DEFAULT_WEIGHT
    room: int | None = None  # items it may still have in flight (max_running minus in flight); None: no cap


@dataclass
class Stride:
    """Weighted fair queueing by stride: who gets each of the next `slots`."""

    passes: dict[str, float] = field(default_factory=dict)
    virtual_time: float = 0.0

    def plan(self, slots: int, shares: dict[str, Share]) -> list[str]:
        """The tenants to serve, one per slot, in order (fewer when caps leave nobody to serve)."""
        heap = []
        for tenant_id, share in shares.items():
            if share.room is not None and share.room <= 0:
                continue
            # a newcomer, or a tenant back after a pause, starts now: no credit for time it was idle
            start = max(self.passes.get(tenant_id, self.virtual_time), self.virtual_time)
            self.passes[tenant_id] = start
            heap.append((start, tenant_id))
        heapq.heapify(heap)
        order: list[str] = []
        room = {t: s.room for t, s in shares.items()}
        while heap and len(order) < slots:
            start, tenant_id = heapq.heappop(heap)
            order.append(tenant_id)
            self.virtual_time = start
            self.passes[tenant_id] = start + 1.0 / max(1, shares[tenant_id].weight)
            left = room[tenant_id]
            if left is not None:
                room[tenant_id] = left - 1
                if left - 1 <= 0:
                    continue
            heapq.heappush(heap, (self.passes[tenant_id], tenant_id))
        return order

    def forget(self, active: Iterable[str]) -> None:
        """Drop the passes of tenants with nothing waiting (they restart at the virtual time)."""
        keep = set(active)
        self.passes = {t: p for t, p in self.passes.items() if t in keep}


MAX_DEPTH = 4096


@dataclass
class DrainRate:
    """How fast workers take messages from the lane: what left the list between two looks (what was
    there, plus what was pushed, minus what is there now), as a moving average per second."""

    per_s: float = 0.0
    _last: tuple[float, int] | None = None  # (when, ready messages then, after that tick's push)

    def saw(self, ready: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None:
            when, before = self._last
            elapsed = now - when
            if elapsed > 0:
                rate = max(0, before - ready) / elapsed
                self.per_s = rate if self.per_s == 0 else 0.8 * self.per_s + 0.2 * rate
        self._last = (now, ready)

    def pushed(self, count: int) -> None:
        if self._last is not None:
            self._last = (self._last[0], self._last[1] + count)


@dataclass
class TickReport:
    free: int
    sent: list[tuple[str, str]]  # (job id, tenant id), in the order pushed
    waiting_tenants: int


class Dispatcher:
    """Feeds one lane. `ready()` says how many messages wait in the lane's Redis list; `push(ids)`
    puts ids there in order (raising when Redis refuses)."""

    def __init__(self, *, sessions: sessionmaker[Session], lane: str, depth: int,
                 ready: Callable[[], int], push: Callable[[list[str]], None], horizon_s: float = 0.0,
                 max_depth: int = MAX_DEPTH, max_per_tick: int = 1024) -> None:
        self.sessions, self.lane, self.depth = sessions, lane, depth
        self.ready, self.push, self.max_per_tick = ready, push, max_per_tick
        self.horizon_s, self.max_depth = horizon_s, max_depth
        self.stride = Stride()
        self.drain = DrainRate()

    def target(self) -> int:
        """How many ready messages to keep: `depth`, or what the fleet takes in `horizon_s` when that
        is more (a fast fleet is never starved by a tick's round trips; a slow one keeps a short
        queue, so a newcomer waits behind little)."""
        return max(self.depth, min(self.max_depth, int(self.drain.per_s * self.horizon_s)))

    def tick(self) -> TickReport:
        ready = self.ready()
        self.drain.saw(ready)
        free = min(self.target() - ready, self.max_per_tick)
        if free <= 0:
            return TickReport(free, [], 0)
        with self.sessions() as session:
            rows = session.execute(_WAITING_TENANTS, {"lane": self.lane}).all()
            if not rows:
                self.stride.forget(())
                session.rollback()
                return TickReport(free, [], 0)
            shares = self._shares(session, rows)
            order = self.stride.plan(free, shares)
            wanted: dict[str, int] = {}
            for tenant_id in order:
                wanted[tenant_id] = wanted.get(tenant_id, 0) + 1
            taken = self._take(session, wanted)
            session.commit()
        self.stride.forget(shares)
        sent = _interleave(order, taken)
        if sent:
            try:
                self.push([job_id for job_id, _ in sent])
            except Exception:
                self._take_back([job_id for job_id, _ in sent])
                raise
            self.drain.pushed(len(sent))
        return TickReport(free, sent, len(rows))

    def _shares(self, session: Session, rows: Sequence[Any]) -> dict[str, Share]:
        shares = {tenant_id: Share(weight or DEFAULT_WEIGHT) for tenant_id, weight, _ in rows}
        capped = {tenant_id: cap for tenant_id, _, cap in rows if cap is not None}
        if capped:
            in_flight = dict(session.execute(
                select(Job.tenant_id, func.count()).where(
                    Job.lane == self.lane, Job.tenant_id.in_(list(capped)), Job.batch_id.isnot(None),
                    Job.dispatched_at.isnot(None), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                .group_by(Job.tenant_id)).all())
            for tenant_id, cap in capped.items():
                shares[tenant_id].room = cap - int(in_flight.get(tenant_id, 0))
        return shares

    def _take(self, session: Session, wanted: dict[str, int]) -> dict[str, list[str]]:
        """Each tenant's next items (as many as planned, or fewer), marked dispatched, in the lane's order."""
        rows = session.execute(_TAKE, {"lane": self.lane, "tenants": list(wanted), "counts": list(wanted.values())})
        taken: dict[str, list[str]] = {tenant_id: [] for tenant_id in wanted}
        for job_id, tenant_id, _, _ in sorted(rows, key=lambda r: (-r[2], r[3], r[0])):
            taken[tenant_id].append(job_id)
        return taken

    def _take_back(self, job_ids: list[str]) -> None:
        """Redis refused the push: the items wait again (best effort; else the reconciler sends them)."""
        try:
            with self.sessions() as session:
                session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
                                .values(dispatched_at=None, enqueued_at=None)
                                .execution_options(synchronize_session=False))
                session.commit()
        except Exception:
            log.exception("could not take back %d undelivered items; the reconciler will send them", len(job_ids))


def _interleave(order: list[str], taken: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The taken ids in the planned order of tenants (a tenant with fewer items than planned is skipped)."""
    queues = {tenant_id: list(reversed(ids)) for tenant_id, ids in taken.items()}
    sent = []
    for tenant_id in order:
        if queues[tenant_id]:
            sent.append((queues[tenant_id].pop(), tenant_id))
    return sent


class LeaderLock:
    """A session advisory lock on its own connection: held while the connection lives."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name = engine, name
        self._conn: Any = None

    def acquire(self) -> bool:
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql("SELECT 1")
                return True
            except DBAPIError:  # the connection died: so did the lock
                self.release()
        conn = self.engine.connect()
        got = conn.execute(select(func.pg_try_advisory_lock(func.hashtext(self.name)))).scalar()
        conn.commit()
        if got:
            self._conn = conn
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                # closed for real, not returned to the pool: a pooled connection would keep the lock
                self._conn.invalidate()
                self._conn.close()
            self._conn = None


def run(dispatcher: Dispatcher, lock: LeaderLock, *, stop: threading.Event, interval_s: float = 0.05,
        standby_s: float = 1.0) -> None:
    """Lead the lane while the lock is ours: a tick whenever the lane has room, a short sleep
    between; else wait to take over. Errors (Postgres or Redis down) are logged and retried."""
    leading = False
    while not stop.is_set():
        try:
            if not lock.acquire():
                if leading:
                    log.warning("dispatcher for lane %s lost its lead", dispatcher.lane)
                leading = False
                stop.wait(standby_s)
                continue
            if not leading:
                log.info("dispatcher for lane %s is leading", dispatcher.lane)
                leading = True
            report = dispatcher.tick()
            if report.sent:
                log.debug("dispatched %d items of %d tenants", len(report.sent), report.waiting_tenants)
                continue  # more may fit at once
        except Exception:
            log.exception("dispatch tick failed; retrying")
            lock.release()
            leading = False
            stop.wait(standby_s)
            continue
        stop.wait(interval_s)
    lock.release()


def dispatcher_from_settings(settings: Any, *, sessions: sessionmaker[Session], celery: Any) -> Dispatcher:
    """The bulk lane's dispatcher as configured, pushing through the deployment's Celery app."""
    from shared.queue import BrokerView, base_queues, enqueue_segments

    broker = BrokerView(settings, unacked_within_s=0)
    lane = base_queues(settings, settings.model)[1]  # the bulk lane of the base this process serves
    return Dispatcher(
        sessions=sessions, lane=lane, depth=settings.dispatch_depth,
        horizon_s=settings.dispatch_horizon_s,
        ready=lambda: broker.ready(lane),
        push=lambda ids: enqueue_segments(celery, job_ids=ids, queue=lane))


def start_in_thread(settings: Any, *, sessions: sessionmaker[Session], celery: Any, engine: Engine,
                    stop: threading.Event) -> threading.Thread:
    """A dispatcher in a daemon thread of this process (a worker's, with CLIPMASK_DISPATCHER=embedded)."""
    dispatcher = dispatcher_from_settings(settings, sessions=sessions, celery=celery)
    lock = LeaderLock(engine, f"clipmask.dispatch:{dispatcher.lane}")
    thread = threading.Thread(target=run, args=(dispatcher, lock), kwargs={
        "stop": stop, "interval_s": settings.dispatch_interval_s}, name="dispatcher", daemon=True)
    thread.start()
    return thread


def waiting_by_tenant(session: Session, lane: str) -> dict[str, int]:
    """Items waiting on the lane per tenant (for gauges)."""
    return dict(session.execute(select(Job.tenant_id, func.count()).where(
        Job.lane == lane, Job.batch_id.isnot(None), Job.status == JobStatus.QUEUED,
        Job.dispatched_at.is_(None)).group_by(Job.tenant_id)).all())
