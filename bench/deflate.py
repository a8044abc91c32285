"""The PNG writer's deflate on the worker's own data: zlib (level 1, what the writer used) against
ISA-L's igzip (`isal`, levels 0-2) and zlib-ng (level 1), CPU ms per 1024x1536 map and bytes, for
masks and soft maps shaped like a trained model's (bench/pipeline.py's realistic stand-in) and
like the random model's (speckled). Every stream is checked to inflate back to its input.

  python bench/deflate.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import realistic_logits, speckled_logits
from worker.engine.postprocess import upsample
from worker.engine.types import Wanted
from worker.outputs import scanlines


def compressors() -> dict[str, Callable[[bytes], bytes]]:
    out: dict[str, Callable[[bytes], bytes]] = {"zlib 1": lambda d: zlib.compress(d, 1)}
    try:
        from isal import isal_zlib

        for level in (0, 1, 2):
            out[f"isal {level}"] = lambda d, level=level: isal_zlib.compress(d, level)
    except ImportError:
        print("isal is not installed", file=sys.stderr)
    try:
        from zlib_ng import zlib_ng

        out["zlib-ng 1"] = lambda d: zlib_ng.compress(d, 1)
    except ImportError:
        print("zlib-ng is not installed (pip install zlib-ng to compare it)", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'masks':9s} {'map':5s} {'deflate':10s} {'CPU ms':>8s} {'KiB':>8s}")
    for kind, make in (("realistic", realistic_logits), ("speckled", speckled_logits)):
        masks, _ = upsample(make(4), prompts=list("abcd"), height=1536, width=1024, threshold=0.4,
                            wanted=Wanted(soft=True))
        for what, maps, sub_filter in (("mask", [m.mask for m in masks], False),
                                       ("soft", [m.soft for m in masks], True)):
            raws = [scanlines(p, sub_filter=sub_filter).tobytes() for p in maps if p is not None]
            for name, compress in compressors().items():
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.process_time()
                    streams = [compress(r) for r in raws]
                    best = min(best, time.process_time() - started)
                assert all(zlib.decompress(s) == r for s, r in zip(streams, raws, strict=True))
                ms, kib = best / len(raws) * 1000, sum(map(len, streams)) / len(raws) / 1024
                figures.setdefault(f"{kind} {what}", {})[name] = {"cpu_ms": round(ms, 3), "kib": round(kib, 1)}
                print(f"{kind:9s} {what:5s} {name:10s} {ms:8.2f} {kib:8.1f}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
