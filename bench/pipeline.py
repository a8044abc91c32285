"""The worker pipeline's ceiling on the host side: everything but the model.

The job runner (worker/runner.py) runs jobs end to end - mark running, fetch the image from a
local HTTP server, decode, "segment", encode every requested output, upload to an S3-protocol
server, record in Postgres - in --threads threads as Celery's thread pool does, with the model
replaced by an instant stand-in that returns precomputed results of the right shape. What it
measures is the most a GPU worker process can deliver, whatever the GPU: images/s, CPU seconds
per image (so images/s per core), and where the time goes per stage.

It starts what it needs: a private Postgres database (dropped at the end), SeaweedFS's S3 server and
an image server, each in its own process (so they don't share this process's GIL or its CPU
clock).

The stand-in's masks come in two kinds, each a row: "realistic" (a few smooth garment-like regions
per image, as a trained model gives them: a torso, legs, a bag, shoes, with concave outlines), and
"speckled" (what the random-weight dev model gives: noise on the decoder's 22x22 grid, upsampled;
PNG compresses it badly and no trained model produces it). With --before, each round also runs
"before" (full-resolution JPEG decodes and Pillow's PNG encoder, as the worker did until 2026-11-22).

  python bench/pipeline.py                       # 1024x1536 JPEGs, 4 labels, mask alone, then all outputs
  python bench/pipeline.py --jobs 400 --threads 16 --outputs mask --masks realistic
  python bench/pipeline.py --json                # last line: {"realistic": {"mask": {"cpu_ms_per_image", ...}}}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker.outputs
from bench.engine import CLOTHES, catalog_jpegs
from shared.db import make_engine, make_session_factory, session_scope
from shared.fetch import FetchPolicy
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.tables import Job
from shared.tenants import create_tenant
from tests.support.services import migrated_database
from worker.deps import RunnerDeps
from worker.engine.postprocess import upsample
from worker.engine.types import SegmentRequest, SegmentResult, Wanted
from worker.runner import run_job
from worker.stops import CancelWatch

OUTPUT_SETS = {"mask": ["mask"], "all": ["mask", "soft", "rle", "cutout", "label_map", "overlay"]}


def pillow_png(pixels, *, sub_filter: bool = False, level: int = 1) -> bytes:  # type: ignore[no-untyped-def]
    """The PNG writer before 2026-11-22 (Pillow, compress_level 1), for the baseline rounds."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


@contextlib.contextmanager
def baseline(deps: RunnerDeps):  # type: ignore[no-untyped-def]
    """Full-resolution decodes and Pillow's PNG encoder: the pipeline as it was before."""
    saved = worker.outputs.encode_png
    deps.reduced_decode = False
    worker.outputs.encode_png = pillow_png
    try:
        yield
    finally:
        worker.outputs.encode_png = saved
        deps.reduced_decode = True


@contextlib.contextmanager
def orm_transitions():  # type: ignore[no-untyped-def]
    """The worker's per-job transitions as the ORM UPDATE ... RETURNING statements they were until
    2026-12-02 (shared/jobs.py runs them as driver SQL now), for the `_orm` rounds and steps."""
    from sqlalchemy import JSON, Interval, bindparam, func, or_, update
    from sqlalchemy.dialects.postgresql import JSONB

    from shared import jobs as jobstate
    from shared.enums import JobStatus

    def as_json(name: str) -> Any:
        return bindparam(name, type_=JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"))

    def kept_unless(name: str) -> Any:
        column = getattr(Job, name)
        return func.coalesce(bindparam(name, type_=column.type), column)

    def returning(statement: Any) -> Any:
        return statement.returning(Job).execution_options(synchronize_session=False, populate_existing=True)

    def final(target: JobStatus) -> Any:
        values: dict[str, Any] = {"status": target, "results": as_json("results"), "error": as_json("error"),
                                  "finished_at": bindparam("finished_at", type_=Job.finished_at.type),
                                  "lease_expires_at": None, **{n: kept_unless(n) for n in sorted(jobstate.RUN_FACTS)}}
        if target == JobStatus.SUCCEEDED:
            values.update(output_keys=as_json("output_keys"), embedding=as_json("embedding"),
                          embedding_model=bindparam("embedding_model", type_=Job.embedding_model.type))
        return returning(update(Job).where(Job.id == bindparam("job_id"),
                                           Job.status.in_(jobstate.ALLOWED_FROM[target])).values(**values))

    statements = {
        jobstate._RUNNING_SQL: returning(
            update(Job).where(Job.id == bindparam("job_id"), Job.status.in_(jobstate.ALLOWED_FROM[JobStatus.RUNNING]),
                              or_(Job.status == JobStatus.QUEUED, Job.lease_expires_at.is_(None),
                                  Job.lease_expires_at < func.now()))
            .values(status=JobStatus.RUNNING, started_at=func.coalesce(Job.started_at, func.now()),
                    attempts=Job.attempts + 1, model_id=bindparam("model_id", type_=Job.model_id.type),
                    model_revision=kept_unless("model_revision"),
                    lease_expires_at=func.now() + bindparam("lease", type_=Interval()))),
        jobstate._SUCCEEDED_SQL: final(JobStatus.SUCCEEDED),
        jobstate._FAILED_SQL: final(JobStatus.FAILED),
    }

    def run_orm(session: Any, sql: str, **params: Any) -> Job | None:
        job: Job | None = session.execute(statements[sql], params).scalar_one_or_none()
        return job

    with mock.patch.object(jobstate, "_run_transition", run_orm):
        yield


def new_connections():  # type: ignore[no-untyped-def]
    """Every image fetch on a connection of its own, as until 2026-12-02 (`_fresh` rounds)."""
    import shared.fetch

    return mock.patch.object(shared.fetch, "_pool_manager", shared.fetch._pool_manager.__wrapped__)


def realistic_logits(labels: int, side: int = 88) -> torch.Tensor:
    """Garment-like regions on a person-shaped layout (logits of +-6 with soft 1-2 cell edges): a
    torso with sleeves, trousers split into legs, a bag on a strap, shoes, in turn per label."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")

    def box(x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
        return torch.minimum(torch.minimum(xx - x0, x1 - xx), torch.minimum(yy - y0, y1 - yy))

    shapes = [
        torch.maximum(box(0.3, 0.2, 0.7, 0.55), torch.maximum(box(0.18, 0.22, 0.32, 0.45),
                                                              box(0.68, 0.22, 0.82, 0.45))),  # top with sleeves
        torch.maximum(box(0.33, 0.53, 0.48, 0.92), box(0.52, 0.53, 0.67, 0.92)),  # trousers: two legs
        torch.maximum(box(0.72, 0.45, 0.9, 0.62), torch.minimum(box(0.62, 0.2, 0.78, 0.47),
                                                                (0.03 - ((xx - yy * 0.6 - 0.45).abs())))),  # bag
        torch.maximum(box(0.3, 0.92, 0.47, 0.98), box(0.53, 0.92, 0.7, 0.98)),  # shoes
    ]
    return torch.stack([shapes[i % len(shapes)] * 300 for i in range(labels)]).clamp(-6, 6)


def speckled_logits(labels: int, side: int = 22) -> torch.Tensor:
    """The random-weight model's kind: independent noise per decoder cell, around the threshold."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(labels, side, side, generator=gen) * 1.5


class InstantSegmenter:
    """The model's stand-in: per (size, labels, wanted), one result computed once and returned at
    once afterwards; `masks` says which kind (realistic_logits or speckled_logits)."""

    model_revision = "stand-in"

    def __init__(self, masks: str = "realistic") -> None:
        self.masks = masks
        self._cache: dict[tuple[object, ...], SegmentResult] = {}
        self._lock = threading.Lock()

    def run(self, request: SegmentRequest) -> SegmentResult:
        # outputs come at the picture's size (request.size), whatever scale the JPEG was decoded at
        width, height = request.size or (request.image.size if hasattr(request.image, "size")
                                         else request.image.shape[1::-1])
        key = (width, height, tuple(request.prompts), request.wanted, self.masks)
        with self._lock:
            if key not in self._cache:
                kind = realistic_logits if self.masks == "realistic" else speckled_logits
                logits = kind(len(request.prompts))
                masks, label_map = upsample(logits, prompts=request.prompts, height=height, width=width,
                                            threshold=request.threshold, wanted=request.wanted)
                self._cache[key] = SegmentResult(masks, logits, label_map)
            return self._cache[key]


def listening(database_url: str) -> CancelWatch:
    """The worker's cancel listener, connected (as the worker starts it at worker_ready)."""
    watch = CancelWatch(database_url)
    watch.start()
    if not watch.listening.wait(30):
        raise RuntimeError("the cancel listener did not connect")
    return watch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start_servers(width: int, height: int, name: str, *,
                  sink: bool = False) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    """The benchmarks' image server (8 catalog JPEGs of width x height) and SeaweedFS's S3 server (keys
    x/x, objects in a temporary folder), each a process of its own, answering: (processes, image port,
    S3 port). With `sink`, one process of bench/sink.py serves both (the images, and PUTs it reads and
    drops) for a fraction of their CPU."""
    work = Path(tempfile.mkdtemp(prefix=f"clipmask-{name}-"))
    files = []
    for i, data in enumerate(catalog_jpegs(8, width, height)):
        files.append(work / f"{i}.jpg")
        files[-1].write_bytes(data)
    if sink:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "sink.py"), str(port),
                                   *map(str, files)])]
        wait_port(port)
        return procs, port, port
    from cli.dev_s3 import Ports
    from cli.dev_s3 import start as start_seaweedfs

    image_port, ports = free_port(), Ports(*(free_port() for _ in range(8)))
    procs = [
        subprocess.Popen([sys.executable, "-m", "http.server", str(image_port), "--bind", "127.0.0.1",
                          "--directory", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        start_seaweedfs(work / "s3", ports, access_key="x", secret_key="x", log_path=work / "s3.log"),
    ]
    wait_port(image_port)
    return procs, image_port, ports.s3


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc), for counting servers apart."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def add_jobs(sessions: Any, tenant_id: str, urls: list[str], labels: list[str],
             outputs: list[str] | None = None) -> list[str]:
    """Queued jobs, one per image URL, each with `labels` as text prompts and `outputs` (mask alone by
    default): their ids. Rows only; whoever runs them takes the ids."""
    ids = [str(uuid.uuid4()) for _ in urls]
    with session_scope(sessions) as session:
        for job_id, url in zip(ids, urls, strict=True):
            session.add(Job(id=job_id, tenant_id=tenant_id, status="queued", input={"image_url": url},
                            prompts=labels, threshold=0.4, results=[], metadata_={},
                            outputs_requested=outputs or ["mask"],
                            labels=[{"name": p, "prompts": [p], "source": "text"} for p in labels]))
    return ids


def host_steps(deps: RunnerDeps, sessions, tenant_id: str, url: str, labels: list[str], *,  # type: ignore[no-untyped-def]
               width: int, height: int, repeat: int = 60, before: bool = False) -> dict[str, float]:
    """Each step of a mask-only job alone, in this thread, as the runner calls it: CPU ms per call
    (median of `repeat` rounds of 5 calls). Where the 10 ms a job could cost goes. With `before`,
    also the fetch on a new connection and the transitions as ORM statements (" (before)" rows)."""
    import statistics

    from shared import jobs as jobstate
    from shared.fetch import fetch_image_bytes
    from shared.images import decode, jpeg_header
    from worker.deps import MODEL_INPUT
    from worker.outputs import png_gray, upload_all

    data = fetch_image_bytes(url, deps.fetch_policy).data
    masks, _ = upsample(realistic_logits(len(labels)), prompts=labels, height=height, width=width, threshold=0.4,
                        wanted=Wanted())
    pngs = [png_gray(m.mask) for m in masks]
    results = [{"prompt": p, "source": "text", "bbox": m.bbox, "area_fraction": 0.1, "score": 0.9, "refine": "none",
                "mask_key": f"masks/{tenant_id}/x/{i}.png"} for i, (p, m) in enumerate(zip(labels, masks, strict=True))]
    job_ids = add_jobs(sessions, tenant_id, [url] * (repeat * 5 * (2 if before else 1)), labels)
    running = iter(job_ids)
    done_ids: list[str] = []  # taken and not yet finished

    def take() -> None:
        job_id = next(running)
        with session_scope(sessions) as session:
            job = jobstate.mark_running(session, job_id, model_id="stand-in", lease_s=60)
            jobstate.started_event(session, job, deps.storage)
        done_ids.append(job_id)

    def finish() -> None:
        with session_scope(sessions) as session:
            jobstate.mark_succeeded(session, done_ids.pop(), results=results, storage=deps.storage,
                                    facts={"image_width": width, "image_height": height})

    def fetch() -> None:
        fetch_image_bytes(url, deps.fetch_policy)

    steps: dict[str, Any] = {
        "fetch (HTTP GET)": fetch,
        "decode (DCT-reduced JPEG)": lambda: decode(data, max_pixels=deps.max_pixels, at_least=MODEL_INPUT),
        # what the job thread does instead when the engine decodes on the device (worker/engine/jpeg.py)
        "header (device decode)": lambda: jpeg_header(data, max_pixels=deps.max_pixels),
        f"encode {len(pngs)} PNGs": lambda: [png_gray(m.mask) for m in masks],
        f"{len(pngs)} PUTs (together)": lambda: upload_all(deps.storage, [(f"steps/{i}.png", b, "image/png")
                                                                       for i, b in enumerate(pngs)]),
        "commit: running": take,
        "commit: succeeded": finish,
    }
    swapped = {"fetch (HTTP GET)": new_connections, "commit: running": orm_transitions,
               "commit: succeeded": orm_transitions} if before else {}
    out: dict[str, float] = {}
    for name, step, swap in [*((name, step, contextlib.nullcontext) for name, step in steps.items()),
                             *((f"{name} (before)", steps[name], swap) for name, swap in swapped.items())]:
        rounds = []
        with swap():
            for _ in range(repeat):
                cpu = time.process_time()
                for _ in range(5):
                    step()
                rounds.append((time.process_time() - cpu) / 5 * 1000)
        out[name] = statistics.median(rounds)
    return out


def run_round(deps: RunnerDeps, sessions, tenant_id: str, urls: list[str], labels: list[str], outputs: list[str],
              threads: int) -> dict[str, object]:
    stage_totals: dict[str, float] = {}
    lock = threading.Lock()

    def on_stage(stage: str, seconds: float) -> None:
        with lock:
            stage_totals[stage] = stage_totals.get(stage, 0.0) + seconds

    deps.on_stage = on_stage
    job_ids = add_jobs(sessions, tenant_id, urls, labels, outputs)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(partial(run_job, deps=deps), job_ids))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    done = statuses.count("succeeded")
    if done != len(job_ids):
        raise RuntimeError(f"only {done} of {len(job_ids)} jobs succeeded: {set(statuses)}")
    return {"images": done, "wall_s": wall, "cpu_s": cpu, "images_per_s": done / wall,
            "images_per_cpu_s": done / cpu, "cpu_ms_per_image": cpu / done * 1000,
            "stage_ms_per_image": {k: v / done * 1000 for k, v in sorted(stage_totals.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--threads", type=int, default=8, help="like the worker's --concurrency (threads pool)")
    parser.add_argument("--size", default="1024x1536")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--outputs", choices=[*OUTPUT_SETS, "both"], default="both")
    parser.add_argument("--masks", choices=["realistic", "speckled", "both"], default="both")
    parser.add_argument("--before", action="store_true", help="also the pipeline as it was before 2026-11-22")
    parser.add_argument("--compare-deflate", action="store_true",
                        help="also each round with zlib as the PNG writer's deflate (row suffix _zlib)")
    parser.add_argument("--compare-puts", action="store_true",
                        help="also each round with boto3 for the PUTs (row suffix _boto3)")
    parser.add_argument("--compare-orm", action="store_true",
                        help="also each round with the job transitions as ORM statements (row suffix _orm)")
    parser.add_argument("--compare-fetch", action="store_true",
                        help="also each round with a new connection for every image fetch (row suffix _fresh)")
    parser.add_argument("--compare-stops", action="store_true",
                        help="also each round with a database query at every stage boundary (row suffix _asking)")
    parser.add_argument("--compare-device-decode", action="store_true",
                        help="also each round with the JPEG decode moved to the engine, as nvJPEG does it on a GPU "
                             "(the job thread reads the header alone; row suffix _device)")
    parser.add_argument("--sink", action="store_true",
                        help="images and PUTs through bench/sink.py, not http.server and SeaweedFS")
    parser.add_argument("--steps", action="store_true",
                        help="first each host step of a mask-only job alone, in one thread (CPU ms per call)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    labels = CLOTHES[: args.prompts]

    procs, image_port, s3_port = start_servers(width, height, "pipeline", sink=args.sink)
    report: dict[str, object] = {"size": f"{width}x{height}", "labels": len(labels), "threads": args.threads,
                                 "jobs": args.jobs, "cpus": os.cpu_count(), "sink": args.sink}
    try:
        with migrated_database(f"clipmask_pipeline_{uuid.uuid4().hex[:8]}") as url:
            settings = Settings(database_url=url, s3_endpoint_url=f"http://127.0.0.1:{s3_port}",
                                s3_bucket=f"pipeline-{uuid.uuid4().hex[:8]}", s3_access_key_id="x",
                                s3_secret_access_key="x")
            sessions = make_session_factory(make_engine(url, pool_size=args.threads + 2))
            storage = ObjectStorage(settings)
            storage.ensure_bucket()
            with session_scope(sessions) as session:
                tenant_id = create_tenant(session, name="pipeline").tenant_id
            stand_in = InstantSegmenter()  # one for the process, as the worker's engine: its cache holds
            deps = RunnerDeps(sessions, storage, lambda: stand_in, FetchPolicy(allow_private=True),
                              settings.max_image_pixels, "stand-in", cancels=listening(url))
            kinds = ["realistic", "speckled"] if args.masks == "both" else [args.masks]
            urls = [f"http://127.0.0.1:{image_port}/{i % 8}.jpg" for i in range(args.jobs)]
            run_round(deps, sessions, tenant_id, urls[: args.threads * 2], labels, ["mask"], args.threads)  # warm
            print(f"size={width}x{height} labels={len(labels)} threads={args.threads} jobs={args.jobs} "
                  f"cpus={os.cpu_count()} (the model is an instant stand-in)", flush=True)
            if args.steps:
                steps = host_steps(deps, sessions, tenant_id, urls[0], labels, width=width, height=height,
                                   before=args.compare_orm or args.compare_fetch)
                report["steps_cpu_ms"] = steps
                for step, ms in steps.items():
                    print(f"  step {step:<37} {ms:6.2f} CPU ms", flush=True)
                total = sum(ms for step, ms in steps.items() if not step.endswith("(before)"))
                host, device = total - steps["header (device decode)"], total - steps["decode (DCT-reduced JPEG)"]
                print(f"  steps together, decode on the host   {host:6.2f} CPU ms\n"
                      f"  steps together, decode on the device {device:6.2f} CPU ms", flush=True)
            for kind in kinds:
                stand_in.masks = kind
                rows: dict[str, object] = {}
                for name in (["mask", "all"] if args.outputs == "both" else [args.outputs]):
                    variants = ((("before",) if args.before else ()) + (("zlib",) if args.compare_deflate else ())
                                + (("boto3",) if args.compare_puts else ())
                                + (("asking",) if args.compare_stops else ())
                                + (("orm",) if args.compare_orm else ()) + (("fresh",) if args.compare_fetch else ())
                                + (("device",) if args.compare_device_decode else ()))
                    for variant in (*variants, "now"):
                        with {"before": lambda: baseline(deps),
                              # the PNG writer's deflate, the PUTs' client, the boundaries' listener swapped back
                              "zlib": lambda: mock.patch.object(worker.outputs, "DEFLATE", "zlib"),
                              "boto3": lambda: mock.patch.object(storage, "put_client", "boto3"),
                              "asking": lambda: mock.patch.object(deps, "cancels", None),
                              "orm": orm_transitions, "fresh": new_connections,
                              # the stand-in takes EncodedJpeg like an engine with a device decoder
                              "device": lambda: mock.patch.object(stand_in, "decodes_jpeg", "nvjpeg", create=True),
                              "now": contextlib.nullcontext}[variant]():
                            figures = run_round(deps, sessions, tenant_id, urls, labels, OUTPUT_SETS[name],
                                                args.threads)
                        rows[name if variant == "now" else f"{name}_{variant}"] = figures
                        stages = "  ".join(f"{k} {v:.1f}" for k, v in figures["stage_ms_per_image"].items())  # type: ignore[union-attr]
                        print(f"masks={kind:<9} outputs={name:<4} {variant:<6}: {figures['images_per_s']:6.1f} "
                              f"images/s  {figures['images_per_cpu_s']:6.1f} images per CPU-second (per core)  "
                              f"{figures['cpu_ms_per_image']:6.1f} CPU ms/image", flush=True)
                        print(f"  stage ms per image (wall, summed over threads): {stages}", flush=True)
                report[kind] = rows
    finally:
        for proc in procs:  # SeaweedFS takes up to 25 s to stop gracefully (its filer, then its volumes)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
