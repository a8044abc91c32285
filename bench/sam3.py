"""SAM 3 benchmark: stock transformers (the model called once per prompt) against the clipmask
engine (one vision pass per image, cached text, (image, prompt) pairs batched), same images, same
run, on the full facebook/sam3 architecture (`Sam3Config()`'s defaults, random weights: timings
are the real checkpoint's, its masks mean nothing).

  python bench/sam3.py --device cpu --images 2 --prompts 1,4
  python bench/sam3.py --device cuda --images 64 --prompts 1,4,16 --batch 1,8 --json

- stock: `Sam3Model(pixel_values, input_ids)` once per (image, prompt), then the contract's
  post-processing (sigmoid(logit) x sigmoid(presence) > 0.5; masks upsampled, > 0.5). The
  pixel values are the engine's own preprocessing on both sides (stock Sam3Processor needs
  torchvision; README "SAM 3 and torchvision").
- engine: Sam3Engine.segment_batch on `--batch` requests at a time, instance masks brought back.
Prints images/s per prompt count and batch, the speedup, the model's load time, the first
request's latency after load, and peak memory (GPU: max allocated; CPU: the process's peak RSS).
With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine.devmodel import write_sam3_dev_model
from worker.engine.families.sam3 import Sam3Engine, load_sam3
from worker.engine.types import SegmentRequest, Wanted

WORDS = ["shirt", "pants", "dress", "shoe", "bag", "hat", "jacket", "skirt", "belt", "scarf", "sock", "glove",
         "coat", "sweater", "boot", "watch"]


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8) for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def stock(engine: Sam3Engine, arrays: list[np.ndarray], prompts: list[str]) -> float:
    """Seconds for every image, one model call per prompt."""
    model, tok, dev = engine.loaded.model, engine.loaded.tokenizer, engine.loaded.device
    start = time.perf_counter()
    for arr in arrays:
        pixels = engine.preprocess([arr])
        for prompt in prompts:
            text = tok([prompt], padding="max_length", max_length=32, truncation=True, return_tensors="pt").to(dev)
            out = model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()
            keep = scores[0] > 0.5
            masks = out.pred_masks[0][keep].float().sigmoid()
            if len(masks):
                up = F.interpolate(masks.unsqueeze(0), size=arr.shape[:2], mode="bilinear", align_corners=False)
                (up > 0.5).cpu()
    sync(dev)
    return time.perf_counter() - start


@torch.inference_mode()
def engine_run(engine: Sam3Engine, arrays: list[np.ndarray], prompts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(arrays), batch):
        engine.segment_batch([SegmentRequest(a, prompts, 0.5, wanted=Wanted(instances=True))
                              for a in arrays[i: i + batch]])
    sync(engine.loaded.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", help="on CUDA")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--prompts", default="1,4,16")
    parser.add_argument("--batch", default="1", help="requests per engine batch, comma separated")
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    scratch = tempfile.TemporaryDirectory(prefix="sam3-full-")  # 3.4 GB of fp32 weights, removed at exit
    folder = Path(scratch.name)
    t0 = time.perf_counter()
    write_sam3_dev_model(folder, size="full")
    built = time.perf_counter() - t0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Sam3Engine(load_sam3(str(folder), device=args.device, dtype=args.dtype, cpu_dtype="fp32"))
    sync(device)
    load_s = time.perf_counter() - t0
    arrays = images(args.images)
    first = engine_run(engine, arrays[:1], ["shirt"], 1)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "images": args.images, "model_build_s": round(built, 1),
                    "load_s": round(load_s, 2), "first_request_s": round(first, 3), "runs": []}
    for count in [int(p) for p in args.prompts.split(",")]:
        prompts = WORDS[:count]
        row: dict = {"prompts": count}
        if not args.no_stock:
            row["stock_images_per_s"] = round(args.images / stock(engine, arrays, prompts), 4)
        for batch in [int(b) for b in args.batch.split(",")]:
            seconds = engine_run(engine, arrays, prompts, batch)
            row[f"engine_b{batch}_images_per_s"] = round(args.images / seconds, 4)
            if "stock_images_per_s" in row:
                row[f"speedup_b{batch}"] = round(row[f"engine_b{batch}_images_per_s"] / row["stock_images_per_s"], 2)
        report["runs"].append(row)
        print(row, flush=True)
    if device.type == "cuda":
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(report) if args.json else report)
    scratch.cleanup()


if __name__ == "__main__":
    main()
