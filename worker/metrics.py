"""Prometheus metrics of a worker process, served on its own port (CLIPMASK_WORKER_METRICS_PORT).

One worker process per GPU (threads pool), so one port per process; in compose each worker
container has its own address. GPU memory is read at scrape time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

STAGE_SECONDS = Histogram(
    "clipmask_job_stage_seconds", "Time a job spends in each stage", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JOB_SECONDS = Histogram(
    "clipmask_job_duration_seconds", "Time from start to end of a job run", ["status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
JOBS_FINISHED = Counter("clipmask_jobs_finished", "Job runs that ended, by status and error code",
                        ["status", "code"])
BATCH_SIZE = Histogram("clipmask_batch_size", "Images per forward pass of the engine",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


def on_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage).observe(seconds)


def on_finish(status: str, code: str | None, seconds: float) -> None:
    JOBS_FINISHED.labels(status, code or "").inc()
    JOB_SECONDS.labels(status).observe(seconds)


def on_batch(size: int) -> None:
    BATCH_SIZE.observe(size)


class GpuMemoryCollector(Collector):
    """clipmask_gpu_memory_bytes{device,kind}: allocated and reserved CUDA memory, when on CUDA."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("clipmask_gpu_memory_bytes", "CUDA memory of this process",
                                   labels=["device", "kind"])
        torch = sys.modules.get("torch")  # never import torch (or touch CUDA) just to report
        if torch is not None and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                family.add_metric([str(index), "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([str(index), "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


class JpegDecodeCollector(Collector):
    """clipmask_jpeg_decoded_total{where}: JPEGs the engine decoded with their batch, on the device
    (nvJPEG) or on the host by Pillow (worker/engine/jpeg.py). "host" on a GPU worker: JPEGs nvJPEG
    refused; many of them, look at the logs."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("clipmask_jpeg_decoded", "JPEGs decoded by the engine's batch decoder",
                                     labels=["where"])
        jpeg = sys.modules.get("worker.engine.jpeg")  # loaded with the engine; never imported to report
        for where, count in (jpeg.DECODED if jpeg is not None else {"device": 0, "host": 0}).items():
            family.add_metric([where], float(count))
        yield family


_started: set[int] = set()


def serve(port: int, host: str) -> None:
    """Start the metrics HTTP server once per process (port 0: don't)."""
    if port and port not in _started:
        REGISTRY.register(GpuMemoryCollector())
        REGISTRY.register(JpegDecodeCollector())
        start_http_server(port, addr=host)
        _started.add(port)
