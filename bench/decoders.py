"""Serving fine-tuned decoders: a batch whose images each use a different decoder against the same
batch on one decoder (the base's), same run, and what a decoder costs on first use.

  python bench/decoders.py                 # tiny model
  python bench/decoders.py --model full    # rd64's architecture (random weights)

The engine runs one vision pass for the batch whatever decoders it needs; only the decoder step is
grouped by decoder (worker/engine/fast.py). "First use" is what a worker pays for a revision it has
not served yet: reading the safetensors bytes into tensors (worker/decoders.py) and building the
decoder copy (FastEngine.tuned_decoder). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import CLOTHES, catalog_jpegs, model_path
from worker.engine import FastEngine, SegmentRequest, load_clipseg
from worker.engine.finetuned import decoder_tensors
from worker.engine.types import Decoder


def median_s(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | full | hub id or directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=8, help="images in the batch, each with its own decoder")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", default="768x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    width, height = (int(v) for v in args.size.split("x"))
    loaded = load_clipseg(model_path(args.model), device=args.device)
    engine = FastEngine(loaded, max_decoders=args.images + 1)
    images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
              for data in catalog_jpegs(args.images, width, height)]
    prompts = CLOTHES[: args.prompts]
    base_tensors = decoder_tensors(loaded.model)
    gen = torch.Generator().manual_seed(0)

    def tuned(i: int) -> Decoder:
        return Decoder(f"sha256:{i:064x}", {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(v)).contiguous()
                                            if v.is_floating_point() else v for k, v in base_tensors.items()})

    decoders = [tuned(i) for i in range(args.images)]
    from safetensors.torch import load, save

    blob = save({k: v.cpu() for k, v in decoders[0].tensors.items()})
    read_s = median_s(lambda: load(blob), args.repeat)
    start = time.perf_counter()
    engine.tuned_decoder(decoders[0])
    build_s = time.perf_counter() - start

    def batch(which: list[Decoder | None]) -> None:
        engine.segment_batch([SegmentRequest(img, prompts, 0.4, decoder=d) for img, d in zip(images, which,
                                                                                            strict=True)])

    one: list[Decoder | None] = [None] * args.images
    batch(one)  # warm-up: text cache, allocator
    batch(list(decoders))  # every decoder built once (first use)
    single_s = median_s(lambda: batch(one), args.repeat)
    mixed_s = median_s(lambda: batch(list(decoders)), args.repeat)
    same_tuned_s = median_s(lambda: batch([decoders[0]] * args.images), args.repeat)
    print(f"model={args.model} device={args.device} images={args.images} size={width}x{height} "
          f"labels={len(prompts)} threads={torch.get_num_threads()} (medians of {args.repeat})", flush=True)
    rows = [("one decoder (the base's)", single_s), ("one fine-tuned decoder", same_tuned_s),
            (f"{args.images} different fine-tuned decoders", mixed_s)]
    for name, seconds in rows:
        print(f"{name:<36} {args.images / seconds:8.2f} images/s  ({seconds * 1000:8.1f} ms a batch)", flush=True)
    print(f"mixed against one decoder: {mixed_s / single_s:.2f}x the time", flush=True)
    mib = sum(t.numel() * t.element_size() for t in base_tensors.values()) / 2**20
    print(f"first use of a decoder ({mib:.1f} MiB of tensors): read {read_s * 1000:.1f} ms + build "
          f"{build_s * 1000:.1f} ms", flush=True)
    if args.json:
        print(json.dumps({"images_per_s_one_decoder": args.images / single_s,
                          "images_per_s_one_tuned": args.images / same_tuned_s,
                          "images_per_s_mixed": args.images / mixed_s, "mixed_over_one": mixed_s / single_s,
                          "first_use_read_ms": read_s * 1000, "first_use_build_ms": build_s * 1000,
                          "decoder_mib": mib}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
