"""End to end through real worker processes, the way a GPU host runs them (issue 22, item 5).

Jobs go into Postgres and their ids into Redis (Celery's bulk queue, as a batch's do); N Celery
worker processes under `python -m worker.processes` take them, each with its own engine on the
device: images fetched over HTTP, decoded (on the device where CLIPMASK_DEVICE_DECODE picks
nvJPEG), segmented at `--prompts` labels with `mask` outputs, PNGs PUT, rows committed. Prints per
process count:
- images/s on this one device (the card's figure: the run uses one GPU);
- the share of "engine alone": the same engine in this process on ready pixel batches (vision
  encoder and decoder at the batch size, no decode, upsampling or I/O), measured first;
- vision TFLOP/s that rate implies (the truncated vision encoder's FLOPs per image) against the
  card's bf16 peak, and the encoder's own rate alone at the batch size;
- CPU ms per job of the worker processes (all their threads: Celery, I/O, inference, the CUDA
  driver's host side), and the mean GPU busy share where NVML answers;
- where the time goes, from the workers' own metrics (scraped before and after): each stage's
  wall ms per job (fetch, decode, infer, encode, upload; a job thread's time, so infer includes
  the wait for its batch), the mean batch size, and the JPEGs decoded on the device or the host.

The images and the PUTs go to bench/sink.py in its own process, not the dev S3 server (moto's CPU
per PUT is more than the worker's and would set the figure on a shared host; in production the
object store is elsewhere); its CPU is reported apart. Postgres and Redis run on the same host.

  python bench/e2e.py --model full --device cuda --processes 4,8 --jobs 4000 --batch 32 --json
  python bench/e2e.py --model tiny --device cpu --processes 1 --jobs 40     # a smoke run here

Needs a Postgres with pgvector (as the tests find one: CLIPMASK_TEST_PG_PORT, else
scripts/pgvector.sh) and Redis at CLIPMASK_REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.engine import BF16_PEAK, CLOTHES, model_path, vision_flops, vision_tflops  # noqa: E402
from bench.pipeline import add_jobs, cpu_seconds, start_servers  # noqa: E402
from shared.db import make_engine, make_session_factory, session_scope  # noqa: E402
from shared.queue import enqueue_segments, make_celery  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.tables import Job  # noqa: E402
from shared.tenants import create_tenant  # noqa: E402
from tests.support.services import migrated_database, settings_env  # noqa: E402
from worker.engine import FastEngine, load_clipseg  # noqa: E402

FINAL = ("succeeded", "failed", "canceled")


def engine_alone(path: str, device: str, dtype: str, batch: int, labels: list[str], rounds: int) -> dict[str, Any]:
    """The engine's model part alone on ready, normalised pixel batches: images/s at `batch` with
    these labels (text embeddings cached, as in a steady run), the vision FLOPs per image, and the
    vision encoder's own TFLOP/s at the batch (CUDA only)."""
    loaded = load_clipseg(path, device=device, dtype=dtype)
    engine = FastEngine(loaded)
    pre = loaded.preprocessing
    pixels = torch.randn(batch, 3, pre.height, pre.width, device=loaded.device).to(engine.dtype)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        engine.logits_from_pixels(pixels, [labels] * batch)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        engine.logits_from_pixels(pixels, [labels] * batch)
    sync()
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"engine_alone_images_per_s": rounds * batch / seconds,
                           "vision_gflop_per_image": vision_flops(engine, engine.depth) / 1e9}
    out.update(vision_tflops(engine, batch) or {})
    del engine, loaded, pixels
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def family(pid: int) -> list[int]:
    """The pid and its descendants alive now, from every process's parent in /proc/*/stat."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += [child for child, parent in parents.items() if parent == current]
    return pids


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1 (worker i serves metrics on base + i - 1)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def scrape(ports: list[int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the workers' metrics, summed over the processes."""
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                total[key] = total.get(key, 0.0) + sample.value
    return total


def where_time_goes(before: dict[Any, float], after: dict[Any, float], jobs: int) -> dict[str, Any]:
    """Per job: each stage's wall ms in its job thread; the mean images per forward pass; JPEGs the
    engine decoded with their batch, on the device (nvJPEG) or on the host (Pillow)."""
    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    stages = sorted({dict(k[1])["stage"] for k in after if k[0] == "clipmask_job_stage_seconds_sum"})
    batches = delta("clipmask_batch_size_count")
    return {"stage_ms_per_job": {s: delta("clipmask_job_stage_seconds_sum", stage=s) / jobs * 1000 for s in stages},
            "mean_batch": delta("clipmask_batch_size_sum") / batches if batches else None,
            "jpeg_decoded": {w: delta("clipmask_jpeg_decoded_total", where=w) for w in ("device", "host")}}


class GpuBusy:
    """The device's busy share sampled through NVML every 0.2 s while running (None without NVML)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml  # nvidia-ml-py, on GPU images

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml: Any = pynvml
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): no figure
            self._nvml = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __enter__(self) -> GpuBusy:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def submit(sessions: Any, app: Any, settings: Settings, tenant_id: str, urls: list[str],
           labels: list[str]) -> list[str]:
    """Mask-only jobs in Postgres, their ids on the bulk queue (as a batch's items go)."""
    ids = add_jobs(sessions, tenant_id, urls, labels)
    enqueue_segments(app, job_ids=ids, queue=settings.bulk_queue)
    return ids


def wait_final(sessions: Any, ids: list[str], timeout: float, supervisor: subprocess.Popen[bytes]) -> dict[str, int]:
    """Poll until every job is final; its statuses counted."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            rows = session.execute(select(Job.status, func.count()).where(Job.id.in_(ids)).group_by(Job.status)).all()
        counts = {status: n for status, n in rows}
        if sum(counts.get(s, 0) for s in FINAL) == len(ids):
            return counts
        if supervisor.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"jobs not final after {timeout:.0f} s (supervisor rc {supervisor.poll()}): {counts}")
        time.sleep(0.1)


def run_layout(settings: Settings, processes: int, args: argparse.Namespace, urls: list[str], labels: list[str],
               sessions: Any, tenant_id: str, sink_pid: int, log_dir: Path) -> dict[str, Any]:
    ports = list(range(base := free_ports(processes), base + processes))
    layout = settings.model_copy(update={"worker_processes": processes, "worker_metrics_port": base})
    env = {**os.environ, **settings_env(layout), "PYTHONUNBUFFERED": "1"}
    queues = ",".join([layout.interactive_queue, layout.bulk_queue, layout.events_queue])
    log_path = log_dir / f"workers-{processes}-{layout.device_decode}.log"
    app = make_celery(layout)
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "worker.processes", "--name", "e2e", "--", "--concurrency", str(args.concurrency),
             "-Q", queues, "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # warm-up: every process loads its model and sees full batches before the clock starts
        warm = submit(sessions, app, layout, tenant_id, urls[: processes * args.batch * 2], labels)
        wait_final(sessions, warm, args.timeout, supervisor)
        workers = family(supervisor.pid)
        metrics0 = scrape(ports)
        cpu0, sink0 = cpu_seconds(workers), cpu_seconds([sink_pid])
        with GpuBusy() as busy:
            start = time.perf_counter()
            ids = submit(sessions, app, layout, tenant_id, urls, labels)
            counts = wait_final(sessions, ids, args.timeout, supervisor)
            wall = time.perf_counter() - start
        cpu, sink = cpu_seconds(workers) - cpu0, cpu_seconds([sink_pid]) - sink0
        metrics1 = scrape(ports)
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
    done = counts.get("succeeded", 0)
    if done != len(ids):
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{processes} processes: only {done} of {len(ids)} jobs succeeded: {counts}\n{tail}")
    return {"processes": processes, "jobs": done, "wall_s": wall, "images_per_s": done / wall,
            "cpu_ms_per_job": cpu / done * 1000, "sink_cpu_ms_per_job": sink / done * 1000,
            "cores_busy": cpu / wall, "gpu_busy_percent": busy.mean, **where_time_goes(metrics0, metrics1, done)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | full | hub id or directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="engine dtype on CUDA")
    parser.add_argument("--processes", default="1", help="worker processes, a comma-separated list: one run each")
    parser.add_argument("--concurrency", type=int, default=16, help="threads per worker process")
    parser.add_argument("--jobs", type=int, default=400, help="measured jobs per run (after a warm-up)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", default="1024x1536")
    parser.add_argument("--batch", type=int, default=32, help="CLIPMASK_MAX_BATCH_IMAGES")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="CLIPMASK_MAX_BATCH_WAIT_MS")
    parser.add_argument("--device-decode", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--engine-rounds", type=int, default=20, help="batches timed for the engine-alone figure")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    labels = CLOTHES[: args.prompts]
    path = model_path(args.model)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report: dict[str, Any] = {"model": args.model, "device": name, "size": f"{width}x{height}", "prompts": len(labels),
                              "batch": args.batch, "concurrency": args.concurrency, "device_decode": args.device_decode,
                              "cpus": os.cpu_count(), "store": "bench/sink.py (PUTs read and dropped)"}
    print(f"model={args.model} device={name} size={width}x{height} prompts={len(labels)} batch={args.batch} "
          f"threads/process={args.concurrency} device_decode={args.device_decode} cpus={os.cpu_count()}", flush=True)

    alone = engine_alone(path, args.device, args.dtype, args.batch, labels, args.engine_rounds)
    report.update(alone)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    report["bf16_peak_tflops"] = peak
    print(f"engine alone: {alone['engine_alone_images_per_s']:.0f} images/s at batch {args.batch}"
          + (f"; vision encoder {alone['vision_tflops']:.0f} TFLOP/s alone" if "vision_tflops" in alone else ""),
          flush=True)

    procs, port, _ = start_servers(width, height, "e2e", sink=True)
    run = uuid.uuid4().hex[:8]
    log_dir = Path(os.environ.get("E2E_LOG_DIR", ROOT / "bench" / "out"))
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        with migrated_database(f"clipmask_e2e_{run}") as url:
            settings = Settings(
                database_url=url, redis_url=os.environ.get("CLIPMASK_REDIS_URL", "redis://127.0.0.1:6379/0"),
                redis_key_prefix=f"clipmask-e2e-{run}:", interactive_queue=f"interactive-{run}",
                bulk_queue=f"bulk-{run}", events_queue=f"events-{run}",
                s3_endpoint_url=f"http://127.0.0.1:{port}", s3_bucket=f"e2e-{run}", s3_access_key_id="x",
                s3_secret_access_key="x", model=path, device=args.device, dtype=args.dtype,
                max_batch_images=args.batch, max_batch_wait_ms=args.wait_ms, device_decode=args.device_decode,
                worker_concurrency=args.concurrency, allow_private_networks=True,
                log_level="WARNING")
            sessions = make_session_factory(make_engine(url, pool_size=4))
            with session_scope(sessions) as session:
                tenant_id = create_tenant(session, name="e2e").tenant_id
            urls = [f"http://127.0.0.1:{port}/{i % 8}.jpg" for i in range(args.jobs)]
            for processes in (int(p) for p in args.processes.split(",")):
                row = run_layout(settings, processes, args, urls, labels, sessions, tenant_id, procs[0].pid, log_dir)
                row["share_of_engine_alone"] = row["images_per_s"] / alone["engine_alone_images_per_s"]
                row["vision_tflops"] = row["images_per_s"] * alone["vision_gflop_per_image"] / 1000
                row["vision_fraction_of_peak"] = row["vision_tflops"] / peak if peak else None
                runs.append(row)
                busy = row["gpu_busy_percent"]
                print(f"processes={processes:<3} {row['images_per_s']:7.1f} images/s "
                      f"({row['share_of_engine_alone'] * 100:.1f}% of engine alone)  vision "
                      f"{row['vision_tflops']:.1f} TFLOP/s" + (f" = {row['vision_fraction_of_peak'] * 100:.1f}% of "
                                                                 f"{peak:.0f} bf16 peak" if peak else "")
                      + f"  {row['cpu_ms_per_job']:.1f} CPU ms/job (sink {row['sink_cpu_ms_per_job']:.1f} apart)"
                      + f"  {row['cores_busy']:.1f} cores busy"
                      + ("" if busy is None else f"  GPU busy {busy:.0f}%"), flush=True)
                batch = row["mean_batch"]
                print("  wall ms per job in its thread: " + "  ".join(
                    f"{stage} {ms:.1f}" for stage, ms in row["stage_ms_per_job"].items())
                    + ("" if batch is None else f"; mean batch {batch:.1f}")
                    + f"; JPEGs decoded on the device {row['jpeg_decoded']['device']:.0f}, "
                      f"host {row['jpeg_decoded']['host']:.0f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    report["runs"] = runs
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
