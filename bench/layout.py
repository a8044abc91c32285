"""Worker processes per host: the job runner's host side (fetch from a local HTTP server, decode,
encode, upload to SeaweedFS's S3 server, record in Postgres) with the instant model stand-in of
bench/pipeline.py, in 1..N processes of `--threads` threads each, on one shared queue of jobs.
Prints images/s per process count and the scaling against one process, so a GPU host's layout can
be sized from its cores (README "A GPU worker's layout").

The servers (HTTP, SeaweedFS, Postgres) run on the same machine and take CPU too: on a small machine the
curve flattens before the worker processes run out of cores.

  python bench/layout.py [--processes 1,2] [--jobs 240] [--threads 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import CLOTHES
from bench.pipeline import InstantSegmenter, add_jobs, cpu_seconds, listening, start_servers
from shared.db import make_engine, make_session_factory, session_scope
from shared.fetch import FetchPolicy
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.tenants import create_tenant
from tests.support.services import migrated_database
from worker.deps import RunnerDeps
from worker.runner import run_job


def worker(settings: Settings, threads: int, jobs: Any, start: Any, results: Any) -> None:
    """One worker process: its own engine stand-in, sessions and storage, `threads` threads taking
    job ids from the shared queue until it is empty."""
    sessions = make_session_factory(make_engine(settings.database_url, pool_size=threads + 2))
    storage = ObjectStorage(settings)
    stand_in = InstantSegmenter()
    deps = RunnerDeps(sessions, storage, lambda: stand_in, FetchPolicy(allow_private=True),
                      settings.max_image_pixels, "stand-in", cancels=listening(settings.database_url))
    warm = jobs.get()  # one job to warm the caches before the clock starts
    run_job(warm, deps=deps)
    results.put(("ready", 0.0, 0))
    start.wait()
    cpu0 = time.process_time()
    done = 0

    def take() -> int:
        count = 0
        # blocking gets until this thread's end mark: get_nowait() raises Empty whenever another
        # thread or process holds the queue's lock, which ended threads early and flattened the curve
        while (job_id := jobs.get(timeout=60)) is not None:
            count += run_job(job_id, deps=deps) == "succeeded"
        return count

    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(lambda _: take(), range(threads)))
    results.put(("done", time.process_time() - cpu0, done))


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent on anything but idle and I/O wait (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def one_layout(settings: Settings, sessions: Any, tenant_id: str, processes: int, threads: int, urls: list[str],
               labels: list[str], servers: list[int]) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    jobs, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    for job_id in add_jobs(sessions, tenant_id, urls[:processes], labels):  # the warm-up jobs
        jobs.put(job_id)
    procs = [ctx.Process(target=worker, args=(settings, threads, jobs, start, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert results.get(timeout=300)[0] == "ready"
    for job_id in add_jobs(sessions, tenant_id, urls, labels):
        jobs.put(job_id)
    for _ in range(processes * threads):  # one end mark per thread
        jobs.put(None)
    time.sleep(0.5)  # (the queue's feeder thread hands the ids over)
    wall0, served0, busy0 = time.perf_counter(), cpu_seconds(servers), machine_busy_s()
    start.set()
    finished = [results.get(timeout=600) for _ in procs]
    wall, served = time.perf_counter() - wall0, cpu_seconds(servers) - served0
    busy = machine_busy_s() - busy0
    for proc in procs:
        proc.join(timeout=30)
    done = sum(n for _, _, n in finished)
    if done != len(urls):
        raise SystemExit(f"{done} of {len(urls)} jobs succeeded with {processes} processes")
    cpu = sum(c for _, c, _ in finished)
    return {"processes": processes, "images_per_s": done / wall, "worker_cpu_ms_per_image": cpu / done * 1000,
            "server_cpu_ms_per_image": served / done * 1000, "busy_cores": busy / wall, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default=",".join(str(n) for n in range(1, (os.cpu_count() or 1) + 1)))
    parser.add_argument("--jobs", type=int, default=240)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", default="1024x1536")
    parser.add_argument("--sink", action="store_true",
                        help="images and PUTs through bench/sink.py, not http.server and SeaweedFS (CPU counted apart)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    labels = CLOTHES[: args.prompts]
    servers, image_port, s3_port = start_servers(width, height, "layout", sink=args.sink)
    rows: list[dict[str, float]] = []
    try:
        with migrated_database(f"clipmask_layout_{uuid.uuid4().hex[:8]}") as url:
            settings = Settings(database_url=url, s3_endpoint_url=f"http://127.0.0.1:{s3_port}",
                                s3_bucket=f"layout-{uuid.uuid4().hex[:8]}", s3_access_key_id="x",
                                s3_secret_access_key="x")
            ObjectStorage(settings).ensure_bucket()
            sessions = make_session_factory(make_engine(url, pool_size=4))
            with session_scope(sessions) as session:
                tenant_id = create_tenant(session, name="layout").tenant_id
            urls = [f"http://127.0.0.1:{image_port}/{i % 8}.jpg" for i in range(args.jobs)]
            print(f"size={width}x{height} labels={len(labels)} threads per process={args.threads} jobs={args.jobs} "
                  f"cpus={os.cpu_count()} (mask outputs, instant stand-in model)", flush=True)
            for processes in (int(p) for p in args.processes.split(",")):
                row = one_layout(settings, sessions, tenant_id, processes, args.threads, urls, labels,
                                 [server.pid for server in servers])
                row["scaling"] = row["images_per_s"] / rows[0]["images_per_s"] if rows else 1.0
                rows.append(row)
                print(f"{processes} process(es): {row['images_per_s']:6.1f} images/s  "
                      f"{row['worker_cpu_ms_per_image']:5.1f} worker CPU ms/image  "
                      f"{row['server_cpu_ms_per_image']:5.1f} {'sink' if args.sink else 'HTTP+S3 server'} CPU "
                      f"ms/image  machine {row['busy_cores']:.2f} of {os.cpu_count()} cores busy  "
                      f"x{row['scaling']:.2f}", flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "threads": args.threads, "sink": args.sink, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
