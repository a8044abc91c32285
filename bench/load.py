"""Load benchmark: a burst of N jobs through the running stack (API, Redis, worker, S3, Postgres).

  make bench-load                     # starts a private stack on the tiny model, runs, stops it
  python bench/load.py --jobs 5000    # against a stack already up (same CLIPMASK_* environment)

Submits N base64 jobs as fast as `--clients` concurrent HTTP clients can, waits until every
job finished, then checks the promise: rows succeeded == N, mask objects in storage ==
N x prompts, no job ran twice and no key was written twice. Prints accept throughput and
latency, end-to-end throughput, and p50/p95/p99 of submit-to-done (the rows' created_at to
finished_at, both written by the services). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import func, select
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db import make_engine, make_session_factory, session_scope
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.tables import Job, Tenant
from shared.tenants import create_tenant

PROMPTS = ["shirt", "pants", "dress", "shoes", "jacket", "hat", "bag", "belt"]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sample_image(index: int) -> str:
    img = Image.new("RGB", (96, 128), (240, 240, 240))
    img.paste(((index * 37) % 256, 80, 160), (24, 20, 72, 90))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = Settings()
    sessions = make_session_factory(make_engine(settings.database_url, pool_size=2))
    with session_scope(sessions) as session:
        tenant = create_tenant(session, name="bench-load")
        # A burst is the point: lift this tenant's rate limit and queue cap.
        row = session.get(Tenant, tenant.tenant_id)
        row.rate_limit_per_s, row.max_queued_jobs = 0.0, args.jobs + 1
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    prompts = PROMPTS[: args.prompts]
    images = [sample_image(i) for i in range(16)]

    accept_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    local = threading.local()
    progress = tqdm(total=args.jobs, desc="submitted", unit="job", file=sys.stderr, mininterval=2)

    def submit(index: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=args.base_url, headers=headers, timeout=60)
        body = {"image_base64": images[index % len(images)], "prompts": prompts, "metadata": {"n": str(index)}}
        start = time.perf_counter()
        resp = local.client.post("/v1/jobs", json=body)
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            if resp.status_code == 202:
                accept_ms.append(elapsed)
            else:
                errors.append(f"{resp.status_code} {resp.text[:200]}")
            progress.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(submit, range(args.jobs)))
    submit_s = time.perf_counter() - t0
    progress.close()
    if errors:
        print(f"{len(errors)} submissions failed, first: {errors[0]}", file=sys.stderr)

    def count(*where) -> int:
        with sessions() as session:
            return session.execute(select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant.tenant_id, *where)).scalar_one()

    done_bar = tqdm(total=len(accept_ms), desc="finished", unit="job", file=sys.stderr, mininterval=2)
    deadline = time.monotonic() + args.timeout
    while True:
        finished = count(Job.status.in_(["succeeded", "failed", "canceled"]))
        done_bar.update(finished - done_bar.n)
        if finished >= len(accept_ms) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    done_bar.close()

    with sessions() as session:
        rows = session.execute(select(Job.created_at, Job.finished_at, Job.status, Job.attempts, Job.results)
                               .where(Job.tenant_id == tenant.tenant_id)).all()
    succeeded = [r for r in rows if r.status == "succeeded"]
    latencies = [(r.finished_at - r.created_at).total_seconds() * 1000 for r in succeeded]
    first = min(r.created_at for r in rows)
    last = max(r.finished_at for r in succeeded) if succeeded else first
    keys = [item["mask_key"] for r in succeeded for item in r.results]
    objects = ObjectStorage(settings).list_keys(f"masks/{tenant.tenant_id}/")
    report = {
        "jobs": args.jobs, "prompts": args.prompts, "clients": args.clients,
        "accepted": len(accept_ms), "refused": len(errors),
        "succeeded": len(succeeded), "not_succeeded": len(rows) - len(succeeded),
        "ran_more_than_once": sum(1 for r in rows if r.attempts != 1),
        "mask_objects": len(objects), "expected_objects": args.jobs * args.prompts,
        "duplicate_keys": len(keys) - len(set(keys)),
        "accept_per_s": round(len(accept_ms) / submit_s, 1),
        "accept_p50_ms": round(statistics.median(accept_ms), 1) if accept_ms else None,
        "accept_p99_ms": round(quantile(accept_ms, 0.99), 1) if accept_ms else None,
        "jobs_per_s": round(len(succeeded) / max(1e-9, (last - first).total_seconds()), 1),
        "masks_per_s": round(len(keys) / max(1e-9, (last - first).total_seconds()), 1),
        "done_p50_ms": round(quantile(latencies, 0.50)) if latencies else None,
        "done_p95_ms": round(quantile(latencies, 0.95)) if latencies else None,
        "done_p99_ms": round(quantile(latencies, 0.99)) if latencies else None,
    }
    ok = (report["succeeded"] == args.jobs and report["mask_objects"] == report["expected_objects"]
          and report["duplicate_keys"] == 0 and report["ran_more_than_once"] == 0)
    print(f"accepted {report['accepted']}/{args.jobs} at {report['accept_per_s']} jobs/s "
          f"(p50 {report['accept_p50_ms']} ms, p99 {report['accept_p99_ms']} ms, {args.clients} clients)")
    print(f"succeeded {report['succeeded']}, mask objects {report['mask_objects']}/{report['expected_objects']}, "
          f"ran twice {report['ran_more_than_once']}, duplicate keys {report['duplicate_keys']}")
    print(f"end to end {report['jobs_per_s']} jobs/s ({report['masks_per_s']} masks/s); submit-to-done "
          f"p50 {report['done_p50_ms']} ms, p95 {report['done_p95_ms']} ms, p99 {report['done_p99_ms']} ms")
    print("OK" if ok else "FAILED: not every accepted job ended succeeded exactly once with its masks")
    if args.json:
        print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
