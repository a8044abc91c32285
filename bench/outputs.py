"""What each output kind costs per image, at 1024x1536 with 4 labels (JPEG in, files out).

One model pass serves every output; what differs is the work after it:
- the engine pass itself, with masks only, and with soft maps and the label map also brought back
  from the device (`Wanted`);
- encoding per kind: mask (PNG), soft (PNG), rle (pycocotools), cutout (RGBA PNG of the bbox crop),
  label_map (palette PNG), overlay (JPEG of the tinted image).
The plain transformers way (processor + model + upsample + threshold + PNG, masks only) runs in
the same process for comparison.

  python bench/outputs.py                      # tiny model: the output costs, the model cheap
  python bench/outputs.py --model full         # the real architecture: the model's share too
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

from bench.engine import CLOTHES, catalog_jpegs, model_path, png
from worker.engine import FastEngine, SegmentRequest, StockEngine, Wanted, load_clipseg
from worker.outputs import coco_rle, cutout_png, label_map_png, overlay_jpeg, png_gray


def timed(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """Median seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | full | hub id or directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="1024x1536", help="WIDTHxHEIGHT")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    width, height = (int(v) for v in args.size.split("x"))
    prompts = CLOTHES[: args.prompts]
    data = catalog_jpegs(1, width, height)[0]
    path = model_path(args.model)
    loaded = load_clipseg(path, device=args.device)
    engine = FastEngine(loaded)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = np.asarray(image)
    print(f"model={args.model} device={args.device} size={width}x{height} labels={len(prompts)} "
          f"threads={torch.get_num_threads()} repeat={args.repeat} (medians)", flush=True)

    decode_s, _ = timed(lambda: Image.open(io.BytesIO(data)).convert("RGB"), args.repeat)
    engine.segment(image, prompts, args.threshold)  # warm-up (text cache, allocator)
    plain_s, _ = timed(lambda: engine.segment_batch([SegmentRequest(image, prompts, args.threshold)]), args.repeat)
    extra = Wanted(soft=True, label_map=True)
    full_s, result = timed(lambda: engine.segment_batch(
        [SegmentRequest(image, prompts, args.threshold, wanted=extra)])[0], args.repeat)
    masks = result.masks  # type: ignore[attr-defined]
    label_map = result.label_map  # type: ignore[attr-defined]

    costs = {
        "mask": timed(lambda: [png_gray(m.mask) for m in masks], args.repeat)[0],
        "soft": timed(lambda: [png_gray(m.soft, sub_filter=True) for m in masks], args.repeat)[0],
        "rle": timed(lambda: [coco_rle(m.mask) for m in masks], args.repeat)[0],
        "cutout": timed(lambda: [cutout_png(pixels, m.soft, m.bbox) for m in masks], args.repeat)[0],
        "label_map": timed(lambda: label_map_png(label_map, len(prompts)), args.repeat)[0],
        "overlay": timed(lambda: overlay_jpeg(pixels, label_map, len(prompts)), args.repeat)[0],
    }
    # before: Pillow's PNG encoder at compress_level 1 (what the worker used until 2026-11-22)
    def pillow_png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def pillow_cutout(m) -> bytes | None:  # type: ignore[no-untyped-def]
        if m.bbox is None:
            return None
        x0, y0, x1, y1 = m.bbox
        return pillow_png(np.dstack([pixels[y0:y1, x0:x1], m.soft[y0:y1, x0:x1]]))

    pillow = {
        "mask": timed(lambda: [pillow_png(m.mask) for m in masks], args.repeat)[0],
        "soft": timed(lambda: [pillow_png(m.soft) for m in masks], args.repeat)[0],
        "cutout": timed(lambda: [pillow_cutout(m) for m in masks], args.repeat)[0],
    }
    stock = StockEngine(loaded)
    stock_s, _ = timed(lambda: [png(m.mask) for m in stock.segment(
        Image.open(io.BytesIO(data)).convert("RGB"), prompts, args.threshold).masks], max(1, args.repeat // 2))

    ms = 1000.0
    print(f"decode JPEG                          {decode_s * ms:8.1f} ms", flush=True)
    print(f"engine pass, masks only              {plain_s * ms:8.1f} ms", flush=True)
    print(f"engine pass, + soft maps + label map {full_s * ms:8.1f} ms  (+{(full_s - plain_s) * ms:.1f} ms)")
    for kind, seconds in costs.items():
        unit = "per image" if kind in ("label_map", "overlay") else f"for {len(prompts)} labels"
        before = f"  (Pillow's encoder: {pillow[kind] * ms:.1f} ms)" if kind in pillow else ""
        print(f"encode {kind:<10}                  {seconds * ms:8.1f} ms  {unit}{before}")
    mask_alone = decode_s + plain_s + costs["mask"]
    everything = decode_s + full_s + sum(costs.values())
    print(f"mask alone, JPEG in -> PNGs          {mask_alone * ms:8.1f} ms/image")
    print(f"all six outputs                      {everything * ms:8.1f} ms/image ({everything / mask_alone:.2f}x)")
    print(f"stock transformers, masks only       {stock_s * ms:8.1f} ms/image (decode, processor, model, PNGs)")
    if args.json:
        print(json.dumps({"model": args.model, "device": args.device, "size": f"{width}x{height}",
                          "labels": len(prompts), "decode_ms": decode_s * ms, "engine_masks_ms": plain_s * ms,
                          "engine_all_ms": full_s * ms, **{f"encode_{k}_ms": v * ms for k, v in costs.items()},
                          **{f"pillow_{k}_ms": v * ms for k, v in pillow.items()},
                          "mask_alone_ms": mask_alone * ms, "all_outputs_ms": everything * ms,
                          "stock_masks_ms": stock_s * ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
