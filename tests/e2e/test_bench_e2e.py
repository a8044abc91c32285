"""`bench/e2e.py`, the end-to-end step of `make gpu-check`, runs here on the tiny model: device time
is short and rare, so the script it spends it on must already work when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.services import ROOT


@pytest.mark.timeout(300)
def test_the_end_to_end_benchmark_runs_every_job_through_worker_processes(tmp_path):
    jobs = 24
    out = subprocess.run(
        [sys.executable, "bench/e2e.py", "--model", "tiny", "--device", "cpu", "--processes", "1", "--jobs", str(jobs),
         "--batch", "4", "--concurrency", "4", "--size", "384x576", "--engine-rounds", "3", "--device-decode", "on",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
        env={**os.environ, "E2E_LOG_DIR": str(tmp_path), "CLIPMASK_BENCH_CACHE": str(tmp_path / "models")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["prompts"] == 4 and report["engine_alone_images_per_s"] > 0
    (run,) = report["runs"]
    assert run["processes"] == 1 and run["jobs"] == jobs  # every measured job succeeded
    assert run["images_per_s"] > 0 and run["cpu_ms_per_job"] > 0 and 0 < run["share_of_engine_alone"]
    assert run["vision_tflops"] > 0 and run["gpu_busy_percent"] is None  # no NVML on a CPU machine
    # where the time went, from the workers' metrics: every stage, every JPEG decoded by the engine
    # (forced on without nvJPEG: by Pillow, in the inference thread)
    assert set(run["stage_ms_per_job"]) >= {"fetch", "decode", "infer", "encode", "upload"}
    assert all(ms > 0 for ms in run["stage_ms_per_job"].values()) and run["mean_batch"] >= 1
    assert run["jpeg_decoded"] == {"device": 0, "host": jobs}
    assert "processes=1" in out.stdout and "CPU ms/job" in out.stdout and "wall ms per job" in out.stdout
