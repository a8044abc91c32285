"""Peak memory of a worker process whose job threads all ask for mattes at once (`refine: matting`).

Each of `--jobs` threads mattes one job: a `--size` x `--size` photo with one garment-like label
whose outline band fills most of it, up to the per-job bound (CLIPMASK_MATTING_MAX_PIXELS, 4M). Each
variant runs in a fresh process and reports that process's peak RSS (ru_maxrss), the wall time, and
the most pixels being solved at once:
- `per-job bound only`: what a worker did before the process budget (every thread solves at once);
- `process budget B`: CLIPMASK_MATTING_PROCESS_PIXELS = B, threads wait for their pixels.

  python bench/matting.py [--jobs 16] [--size 2000] [--budgets 8000000,4000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UNBOUNDED = 10**12


def job_labels(size: int, seed: int):
    from worker.engine.types import PromptMask

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    margin = size // 20
    mask[margin:size - margin, margin:size - margin] = 255  # the box around its outline is nearly the photo
    return image, [PromptMask("garment", mask, 0.9, None, 0.8, soft=mask.copy(), refine="guided")]


def child(jobs: int, size: int, budget: int, per_job: int) -> dict[str, float]:
    from worker.engine.refine import PixelBudget, apply_mattes, warm_up

    warm_up()
    inputs = [job_labels(size, seed) for seed in range(jobs)]
    shared = PixelBudget(budget)
    solved = [0] * jobs

    def run(index: int) -> None:
        image, labels = inputs[index]
        solved[index] = apply_mattes(image, labels, max_pixels=per_job, budget=shared)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(jobs)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": time.perf_counter() - started, "peak_solving_px": shared.peak,
            "solved_px": sum(solved)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--per-job", type=int, default=4_000_000, help="CLIPMASK_MATTING_MAX_PIXELS")
    parser.add_argument("--budgets", default="8000000", help="process budgets to compare, comma-separated")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.jobs, args.size, args.child, args.per_job)))
        return
    rows = []
    for name, budget in [("per-job bound only (before)", UNBOUNDED)] + [
            (f"process budget {int(b):,}", int(b)) for b in args.budgets.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--jobs", str(args.jobs), "--size", str(args.size),
                              "--per-job", str(args.per_job), "--child", str(budget)],
                             capture_output=True, text=True, check=True)
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    if args.json:
        print(json.dumps({"jobs": args.jobs, "size": args.size, "rows": rows}, indent=2))
        return
    print(f"{args.jobs} job threads, one {args.size}x{args.size} label each, per-job bound {args.per_job:,} px")
    print(f"{'variant':32} {'peak RSS MB':>12} {'most px at once':>16} {'solved px':>12} {'wall s':>8}")
    for row in rows:
        print(f"{row['variant']:32} {row['peak_rss_mb']:12.0f} {row['peak_solving_px']:16,} "
              f"{row['solved_px']:12,} {row['wall_s']:8.1f}")


if __name__ == "__main__":
    main()
