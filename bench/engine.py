"""Engine benchmark: stock transformers vs the clipmask engine, same images, same run.

Both sides take JPEG bytes in and give PNG masks (one per prompt, image-sized) out.
- stock: what a user writes. CLIPSegProcessor + CLIPSegForImageSegmentation in fp32, the image
  repeated once per prompt, one job at a time, upsample + threshold + PNG in the same thread.
- engine: the worker's path. I/O threads decode (JPEGs at the smallest DCT scale still at least
  the model's input, as the worker does for mask outputs) and encode PNGs (worker.outputs'
  writer); one inference thread runs the dynamic batcher (one vision pass per image, truncated
  encoder, cached text, bf16 on CUDA).

  python bench/engine.py --model full --device cpu --prompts 4 --images 8
  python bench/engine.py --model full --device cuda --prompts 4 --images 512 --batch 64 --json

Prints images/s, masks/s, p50/p95 latency per image, peak memory and the speedup; with --json
the last line is one JSON object. On CUDA it also reports the vision encoder's TFLOP/s
against the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.images import decode as decode_for_model
from worker.engine import FastEngine, SegmentRequest, load_clipseg
from worker.engine.batcher import DynamicBatcher
from worker.engine.devmodel import write_dev_model
from worker.engine.loading import native_cpu_bf16
from worker.outputs import png_gray

CLOTHES = ["shirt", "pants", "dress", "shoes", "jacket", "skirt", "hat", "bag", "belt", "scarf",
           "sweater", "shorts", "coat", "socks", "gloves", "tie"]

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
BF16_PEAK = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
             "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def model_path(spec: str) -> str:
    if spec in ("tiny", "full"):
        cache = Path(os.environ.get("CLIPMASK_BENCH_CACHE", Path(tempfile.gettempdir()) / "clipmask-bench"))
        target = cache / spec
        if not (target / "config.json").exists():
            write_dev_model(target, size=spec)
        return str(target)
    return spec


def catalog_jpegs(n: int, width: int, height: int) -> list[bytes]:
    """Catalog-like pictures: a light background, a figure of coloured blocks, sensor noise."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = np.full((height, width, 3), rng.integers(200, 245), dtype=np.float32)
        for _ in range(6):
            x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
            x1, y1 = x0 + rng.integers(width // 8, width // 2), y0 + rng.integers(height // 8, height // 2)
            img[y0:y1, x0:x1] = rng.integers(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# ---- memory ---------------------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
        except OSError:
            pass


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the two sides ---------------------------------------------------------------------------

def run_stock(path: str, device: torch.device, images: list[bytes], prompts: list[str], threshold: float):
    from transformers import CLIPSegForImageSegmentation

    from worker.engine.loading import load_processor

    processor = load_processor(path)
    model = CLIPSegForImageSegmentation.from_pretrained(path).to(device).eval()
    latencies = []

    def one(data: bytes) -> list[bytes]:
        image = decode(data)
        inputs = processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        logits = logits.reshape(len(prompts), 1, *logits.shape[-2:])
        up = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        masks = ((torch.sigmoid(up[:, 0]) >= threshold).to(torch.uint8) * 255).cpu().numpy()
        return [png(m) for m in masks]

    one(images[0])  # warm-up
    reset_peak(device)
    start = time.perf_counter()
    for data in images:
        t0 = time.perf_counter()
        one(data)
        latencies.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, latencies, peak_mib(device)


def run_engine(path: str, device: torch.device, dtype: str, images: list[bytes], prompts: list[str],
               threshold: float, batch: int, io_threads: int, compile_: bool, cpu_dtype: str = "fp32"):
    loaded = load_clipseg(path, device=device.type, dtype=dtype, cpu_dtype=cpu_dtype)
    engine = FastEngine(loaded, compile=compile_)
    batcher = DynamicBatcher(engine.segment_batch, max_batch=batch, max_wait_ms=5)

    at_least = (loaded.preprocessing.width, loaded.preprocessing.height)

    def one(data: bytes) -> float:
        t0 = time.perf_counter()
        decoded = decode_for_model(data, max_pixels=10**9, at_least=at_least)
        result = batcher(SegmentRequest(decoded.image, prompts, threshold, size=decoded.size))
        for m in result.masks:
            png_gray(m.mask)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(io_threads) as pool:
        list(pool.map(one, images[: min(len(images), batch)]))  # warm-up (and compile)
        reset_peak(device)
        start = time.perf_counter()
        latencies = list(pool.map(one, images))
        elapsed = time.perf_counter() - start
    batcher.close()
    sizes = batcher.batch_sizes
    return elapsed, latencies, peak_mib(device), engine, (statistics.mean(sizes) if sizes else 0)


def vision_shape(engine: FastEngine) -> tuple[int, int, int]:
    """(tokens, width, MLP width) of the vision encoder at the model's input size."""
    vcfg = engine.loaded.model.config.vision_config
    return engine.vision_tokens, vcfg.hidden_size, vcfg.intermediate_size


def vision_flops(engine: FastEngine, layers: int) -> float:
    """Multiply-adds x 2 of one image through the patch embedding and `layers` encoder layers."""
    vcfg = engine.loaded.model.config.vision_config
    tokens, d, m = vision_shape(engine)
    per_layer = 2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * m
    patch = 2 * (tokens - 1) * d * 3 * vcfg.patch_size**2
    return float(layers * per_layer + patch)


def stage_costs(engine: FastEngine, jpeg: bytes, prompts: list[str], threshold: float,
                repeat: int = 3) -> dict[str, float]:
    """Each stage of the engine side alone on one image (ms, best of `repeat`), the vision
    encoder's rate against this device's own matmul rate, and the compute-bound ceiling of the
    speedup: stock runs every vision layer once per prompt, the engine the truncated tower once."""
    from worker.engine.postprocess import upsample

    lm = engine.loaded
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    def best(fn):  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times) * 1000, out

    at_least = (lm.preprocessing.width, lm.preprocessing.height)
    ms: dict[str, float] = {}
    with torch.inference_mode():
        ms["decode"], decoded = best(lambda: decode_for_model(jpeg, max_pixels=10**9, at_least=at_least))
        arr = np.asarray(decoded.image)
        ms["preprocess"], pixels = best(lambda: engine.preprocess([arr]))
        ms["vision"], acts = best(lambda: engine.activations(pixels))
        ms["decoder"], logits = best(lambda: engine.logits_from_pixels(pixels, [prompts], acts))
        width, height = decoded.size
        ms["upsample"], (masks, _) = best(lambda: upsample(logits[0], prompts=prompts, height=height, width=width,
                                                            threshold=threshold))
        ms["png"], _ = best(lambda: [png_gray(m.mask) for m in masks])
        tokens, d, m = vision_shape(engine)  # the MLP's first matmul, the bulk of the encoder's work
        a = torch.randn(tokens, d, device=lm.device, dtype=engine.dtype)
        b = torch.randn(d, m, device=lm.device, dtype=engine.dtype)
        gemm_ms, _ = best(lambda: [a @ b for _ in range(10)])
    total_layers = lm.model.config.vision_config.num_hidden_layers
    engine_flops = vision_flops(engine, engine.depth)
    return {**{f"{k}_ms": v for k, v in ms.items()},
            "vision_gflops_per_image": engine_flops / 1e9,
            "vision_gflop_per_s": engine_flops / (ms["vision"] / 1000) / 1e9,
            "matmul_gflop_per_s": 10 * 2 * tokens * d * m / (gemm_ms / 1000) / 1e9,
            "compute_bound_speedup_ceiling": len(prompts) * vision_flops(engine, total_layers) / engine_flops}


def vision_tflops(engine: FastEngine, batch: int) -> dict[str, float] | None:
    """Time the truncated vision encoder alone at `batch` and compare with the bf16 peak."""
    lm = engine.loaded
    if lm.device.type != "cuda":
        return None
    pre = lm.preprocessing
    flops = batch * vision_flops(engine, engine.depth)
    pixels = torch.randn(batch, 3, pre.height, pre.width, device=lm.device, dtype=lm.dtype)
    with torch.inference_mode():
        for _ in range(3):
            engine._vision_fn(pixels)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        start.record()
        for _ in range(reps):
            engine._vision_fn(pixels)
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    achieved = flops / seconds / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), float("nan"))
    return {"vision_batch": batch, "vision_tflops": achieved, "bf16_peak_tflops": peak,
            "vision_fraction_of_peak": achieved / peak if peak == peak else float("nan")}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def line(name: str, ips: float, prompts: int, latencies: list[float], mem: float) -> str:
    return (f"{name}: {ips:8.2f} images/s {ips * prompts:8.2f} masks/s  p50 {percentile(latencies, 50) * 1000:8.1f} ms"
            f"  p95 {percentile(latencies, 95) * 1000:8.1f} ms  peak {mem:8.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | full | hub id or directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="engine dtype on CUDA")
    parser.add_argument("--cpu-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="engine dtype on the CPU (auto: bf16 where the CPU has it natively, as the worker)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--stock-images", type=int, default=None, help="images for the (slow) stock side")
    parser.add_argument("--batch", type=int, default=16, help="engine max batch (images)")
    parser.add_argument("--io-threads", type=int, default=None)
    parser.add_argument("--size", default="1024x1536", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine")
    parser.add_argument("--vision-batch", type=int, default=64, help="batch for the TFLOP/s measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    path = model_path(args.model)
    prompts = (CLOTHES * 4)[: args.prompts]
    images = catalog_jpegs(args.images, width, height)
    stock_images = images[: args.stock_images or len(images)]
    io_threads = args.io_threads or max(4, 2 * args.batch)

    print(f"model={args.model} device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})"
          f" threads={torch.get_num_threads()} images={len(images)} stock_images={len(stock_images)} "
          f"size={width}x{height} prompts={len(prompts)} batch={args.batch} dtype={args.dtype} "
          f"cpu_dtype={args.cpu_dtype} (native bf16: {native_cpu_bf16()}, {torch.backends.cpu.get_cpu_capability()})",
          flush=True)

    s_time, s_lat, s_mem = run_stock(path, device, stock_images, prompts, args.threshold)
    s_ips = len(stock_images) / s_time
    print(line("stock ", s_ips, len(prompts), s_lat, s_mem), flush=True)

    e_time, e_lat, e_mem, engine, mean_batch = run_engine(
        path, device, args.dtype, images, prompts, args.threshold, args.batch, io_threads, args.compile,
        args.cpu_dtype)
    e_ips = len(images) / e_time
    print(line("engine", e_ips, len(prompts), e_lat, e_mem) + f"  mean batch {mean_batch:.1f}", flush=True)
    speedup = e_ips / s_ips
    print(f"speedup: {speedup:.2f}x images/s", flush=True)

    report = {
        "model": args.model, "device": str(device), "prompts": len(prompts), "images": len(images),
        "size": f"{width}x{height}", "batch": args.batch,
        "dtype": args.dtype if device.type == "cuda" else str(engine.dtype).removeprefix("torch."),
        "stock_images_per_s": s_ips, "engine_images_per_s": e_ips, "speedup": speedup,
        "stock_masks_per_s": s_ips * len(prompts), "engine_masks_per_s": e_ips * len(prompts),
        "stock_p50_ms": percentile(s_lat, 50) * 1000, "stock_p95_ms": percentile(s_lat, 95) * 1000,
        "engine_p50_ms": percentile(e_lat, 50) * 1000, "engine_p95_ms": percentile(e_lat, 95) * 1000,
        "stock_peak_mib": s_mem, "engine_peak_mib": e_mem, "engine_mean_batch": mean_batch,
    }
    stages = stage_costs(engine, images[0], prompts, args.threshold)
    report.update(stages)
    print("engine stages, one image alone (ms): " + "  ".join(
        f"{k.removesuffix('_ms')} {v:.1f}" for k, v in stages.items() if k.endswith("_ms")), flush=True)
    print(f"vision encoder: {stages['vision_gflops_per_image']:.1f} GFLOP per image at "
          f"{stages['vision_gflop_per_s']:.0f} GFLOP/s; a plain matmul of its shape runs at "
          f"{stages['matmul_gflop_per_s']:.0f} GFLOP/s here; stock runs {stages['compute_bound_speedup_ceiling']:.2f}x "
          f"the engine's vision FLOPs", flush=True)
    flops = vision_tflops(engine, args.vision_batch)
    if flops:
        report.update(flops)
        print(f"vision encoder: {flops['vision_tflops']:.1f} TFLOP/s at batch {args.vision_batch} = "
              f"{flops['vision_fraction_of_peak'] * 100:.1f}% of {flops['bf16_peak_tflops']:.0f} bf16 peak", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
