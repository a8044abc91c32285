"""Fair share of the bulk lane (shared/scheduler.py) on Postgres and Redis, with a stand-in fleet.

The fleet is `--slots` threads that each BRPOP a job id from the lane and hold it `--job-ms`
(a worker's job time), then mark it succeeded; the dispatcher is the real one, in its run loop.
Every scenario uses a lane, tenants and Redis keys of its own. It prints:
1. shares of started jobs over a window while every tenant is backlogged: 1:1, 3:1, and three
   tenants 1:1:1 (goal: within 10 points of the weights' shares);
2. a newcomer's first start after its 1-item batch is accepted while two tenants keep the fleet
   busy (goal <= 5 s), against the same arrival under FIFO (the old single list) in the same run;
3. dispatch capacity: jobs/s one dispatcher hands to an instant fleet, and its CPU per job
   (goal >= 2,000/s), with the depth fixed and with the default horizon (the lane as deep as the
   fleet takes in CLIPMASK_DISPATCH_HORIZON_S);
4. accepting a 10,000-item and a 100,000-item batch in process (Submitter.submit_batch: rows only).

It makes a database of its own (migrated, dropped at the end) on the Postgres with pgvector the
tests use (scripts/pgvector.sh), and uses CLIPMASK_REDIS_URL's Redis under keys of its own.
With --json the last line is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db import make_engine, make_session_factory, session_scope
from shared.enums import JobStatus
from shared.queue import make_celery, segment_job_id
from shared.scheduler import LeaderLock, dispatcher_from_settings, run
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.submit import BatchSpec, JobSpec, SubmitPolicy, Submitter
from shared.tables import Job, Tenant
from shared.tenants import create_tenant
from tests.support.services import migrated_database


class Scenario:
    def __init__(self, base: Settings, *, slots: int, job_ms: float, depth: int,
                 horizon_s: float | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.settings = base.model_copy(update={
            "bulk_queue": f"bench-fair-{tag}", "interactive_queue": f"bench-fair-i-{tag}",
            "redis_key_prefix": f"bench-fair-{tag}:", "dispatch_depth": depth,
            "dispatch_horizon_s": base.dispatch_horizon_s if horizon_s is None else horizon_s})
        self.engine = make_engine(self.settings.database_url, pool_size=slots + 2)
        self.sessions = make_session_factory(self.engine)
        self.celery = make_celery(self.settings)
        self.submitter = Submitter(policy=SubmitPolicy.from_settings(self.settings),
                                   storage=ObjectStorage(self.settings), celery=self.celery)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.key = self.settings.redis_key_prefix + self.settings.bulk_queue
        self.slots, self.job_s = slots, job_ms / 1000
        self.starts: list[tuple[float, str]] = []  # (when, job id), as the fleet takes them
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.dispatch_cpu = 0.0

    def tenant(self, weight: int | None = None) -> Tenant:
        with session_scope(self.sessions) as session:
            made = create_tenant(session, name="bench-fair")
            row = session.get(Tenant, made.tenant_id)
            row.weight, row.max_queued_jobs, row.rate_limit_per_s = weight, 10_000_000, 0.0
        with self.sessions() as session:
            found = session.get(Tenant, made.tenant_id)
            assert found is not None
            return found

    def batch(self, tenant: Tenant, items: int) -> tuple[str, float]:
        spec = BatchSpec(items=[JobSpec(prompts=["shirt"], threshold=0.4, input={"image_url": f"https://x.test/{i}"})
                                for i in range(items)])
        start = time.perf_counter()
        with self.sessions() as session:
            accepted = self.submitter.submit_batch(session, tenant=tenant, spec=spec)
        return accepted.body["id"], time.perf_counter() - start

    def _slot(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        while not self.stop.is_set():
            got = client.brpop([self.key], timeout=1)
            if got is None:
                continue
            job_id = segment_job_id(json.loads(got[1]))
            self.starts.append((time.monotonic(), str(job_id)))
            if self.job_s:
                time.sleep(self.job_s)
                with session_scope(self.sessions) as session:
                    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED))
        client.close()

    def _dispatch(self) -> None:
        start = resource.getrusage(resource.RUSAGE_THREAD)
        dispatcher = dispatcher_from_settings(self.settings, sessions=self.sessions, celery=self.celery)
        lock = LeaderLock(self.engine, f"clipmask.dispatch:{self.settings.bulk_queue}")
        run(dispatcher, lock, stop=self.stop, interval_s=self.settings.dispatch_interval_s)
        end = resource.getrusage(resource.RUSAGE_THREAD)
        self.dispatch_cpu = (end.ru_utime + end.ru_stime) - (start.ru_utime + start.ru_stime)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._slot, daemon=True) for _ in range(self.slots)]
        self.threads.append(threading.Thread(target=self._dispatch, daemon=True))
        for thread in self.threads:
            thread.start()

    def wait_starts(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while len(self.starts) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        self.redis.delete(self.key)
        self.redis.close()
        self.engine.dispose()

    def owners(self, job_ids: list[str]) -> list[str]:
        from sqlalchemy import select

        with self.sessions() as session:
            owner = dict(session.execute(select(Job.id, Job.tenant_id).where(Job.id.in_(job_ids))).all())
        return [owner[j] for j in job_ids]


def shares(base: Settings, weights: list[int], *, items: int, window: int, slots: int, job_ms: float,
           depth: int) -> dict[str, Any]:
    scenario = Scenario(base, slots=slots, job_ms=job_ms, depth=depth)
    try:
        tenants = [scenario.tenant(w) for w in weights]
        for tenant in tenants:  # the first tenant's backlog first: under FIFO the others wait for all of it
            scenario.batch(tenant, items)
        scenario.start()
        scenario.wait_starts(window)
        owners = Counter(scenario.owners([j for _, j in scenario.starts[:window]]))
        got = [round(owners[t.id] / window, 3) for t in tenants]
        goal = [round(w / sum(weights), 3) for w in weights]
        return {"weights": weights, "window": window, "shares": got, "goal": goal,
                "worst_gap": round(max(abs(g - w) for g, w in zip(got, goal, strict=True)), 3)}
    finally:
        scenario.close()


def newcomer(base: Settings, *, backlog: int, slots: int, job_ms: float, depth: int, probes: int) -> dict[str, Any]:
    scenario = Scenario(base, slots=slots, job_ms=job_ms, depth=depth)
    latencies = []
    try:
        a, b = scenario.tenant(), scenario.tenant()
        scenario.batch(a, backlog)
        scenario.batch(b, backlog)
        scenario.start()
        scenario.wait_starts(slots * 4)  # the fleet is busy
        for _ in range(probes):
            c = scenario.tenant()
            posted = time.monotonic()
            batch_id, _ = scenario.batch(c, 1)
            with scenario.sessions() as session:
                from sqlalchemy import select

                job_id = session.execute(select(Job.id).where(Job.batch_id == batch_id)).scalar_one()
            deadline = posted + 120
            while time.monotonic() < deadline:
                started = [when for when, j in list(scenario.starts) if j == job_id]
                if started:
                    latencies.append(started[0] - posted)
                    break
                time.sleep(0.005)
        rate = slots / (job_ms / 1000)
    finally:
        scenario.close()
    fifo_s = 2 * backlog / rate  # under FIFO the newcomer's item is behind both backlogs
    return {"p50_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3), "n": len(latencies),
            "fleet_jobs_per_s": rate, "backlog": 2 * backlog, "fifo_s": round(fifo_s, 1)}


def fifo_position(base: Settings, *, backlog: int) -> int:
    """Where a newcomer's item lands in the old single list: pushed behind both backlogs."""
    from shared.queue import enqueue_segments

    scenario = Scenario(base, slots=0, job_ms=0, depth=1)
    try:
        ids = [f"a{i}" for i in range(backlog)] + [f"b{i}" for i in range(backlog)] + ["newcomer"]
        enqueue_segments(scenario.celery, job_ids=ids, queue=scenario.settings.bulk_queue)
        order = [segment_job_id(json.loads(raw)) for raw in reversed(scenario.redis.lrange(scenario.key, 0, -1))]
        return order.index("newcomer") + 1
    finally:
        scenario.close()


def capacity(base: Settings, *, items: int, depth: int, tenants: int, horizon_s: float) -> dict[str, Any]:
    scenario = Scenario(base, slots=4, job_ms=0, depth=depth, horizon_s=horizon_s)
    try:
        for _ in range(tenants):
            scenario.batch(scenario.tenant(), items // tenants)
        start = time.monotonic()
        scenario.start()
        scenario.wait_starts(items)
        seconds = time.monotonic() - start
    finally:
        scenario.close()
    return {"items": items, "depth": depth, "horizon_s": horizon_s, "tenants": tenants,
            "jobs_per_s": round(items / seconds),
            "cpu_ms_per_job": round(scenario.dispatch_cpu * 1000 / items, 3)}


def accept(base: Settings, sizes: list[int]) -> dict[str, float]:
    scenario = Scenario(base, slots=0, job_ms=0, depth=1)
    try:
        tenant = scenario.tenant()
        return {str(size): round(scenario.batch(tenant, size)[1], 2) for size in sizes}
    finally:
        scenario.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=8, help="the stand-in fleet's slots")
    parser.add_argument("--job-ms", type=float, default=50, help="each job's time in the stand-in fleet")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--capacity-items", type=int, default=20_000)
    parser.add_argument("--accept", default="10000,100000", help="batch sizes to accept")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with migrated_database(f"bench_fair_{uuid.uuid4().hex[:8]}") as url:
        return measure(args, Settings(database_url=url))


def measure(args: argparse.Namespace, base: Settings) -> int:
    report: dict[str, Any] = {"slots": args.slots, "job_ms": args.job_ms, "depth": args.depth}
    fleet = dict(slots=args.slots, job_ms=args.job_ms, depth=args.depth)
    report["shares"] = [shares(base, w, items=args.window, window=args.window, **fleet)
                        for w in ([1, 1], [3, 1], [1, 1, 1])]
    for s in report["shares"]:
        print(f"weights {s['weights']}: shares of the first {s['window']} starts {s['shares']} "
              f"(goal {s['goal']}, worst gap {s['worst_gap']})")
    report["newcomer"] = newcomer(base, backlog=2000, probes=5, **fleet)
    report["newcomer"]["fifo_position"] = fifo_position(base, backlog=2000)
    n = report["newcomer"]
    print(f"newcomer's first start while two tenants keep {n['fleet_jobs_per_s']:.0f} jobs/s busy: p50 {n['p50_s']} s, "
          f"max {n['max_s']} s over {n['n']} (goal <= 5 s); under FIFO it was item {n['fifo_position']} of the list, "
          f"{n['fifo_s']} s at that rate")
    horizons = ((0.0, 1), (0.0, 10), (base.dispatch_horizon_s, 1), (base.dispatch_horizon_s, 10))
    report["capacity"] = [capacity(base, items=args.capacity_items, depth=args.depth, tenants=t, horizon_s=h)
                          for h, t in horizons]
    for c in report["capacity"]:
        how = (f"at least depth {c['depth']}, horizon {c['horizon_s']} s" if c["horizon_s"]
               else f"depth {c['depth']} fixed")
        print(f"dispatch capacity, {how}, {c['tenants']} tenants: {c['jobs_per_s']} jobs/s, "
              f"{c['cpu_ms_per_job']} CPU ms a job in the dispatcher (goal >= 2,000 jobs/s)")
    report["accept_s"] = accept(base, [int(s) for s in args.accept.split(",") if s])
    for size, seconds in report["accept_s"].items():
        print(f"accept a {size}-item batch in process (rows only): {seconds} s")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
