"""Crisp edges: bilinear upsampling (`refine: none`) against `guided` and `matting` on synthetic
garments (evaluation/edges.py: concave outlines with straps, anti-aliased, on textured
backgrounds, 1024x1536; the model's view simulated as CLIPSeg loses detail: the true mask averaged
to the 22x22 token grid, back to 352 bilinearly, blurred sigma 3 px, noise 0.05). Scores against
the true mask: boundary F at 1 px and 2 px, and IoU, at threshold 0.5, through the job path's own
code (worker.engine.postprocess.upsample, worker.engine.refine.matte).

Then the cost at 1024x1536 with 4 labels: upsampling alone, guided, matting (the 4 labels' mattes),
against the engine pass of the full-size architecture on the same image, on this machine's device.

The method's parameters were chosen on seeds 100-105 (`--sweep` reruns that), never on the seeds
scored here (0..N-1).

  python bench/refine.py --images 24 [--device cpu|cuda] [--json]
  python bench/refine.py --sweep
  python bench/refine.py --pictures docs/screenshots   # the README's before/after cutout edge
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.edges import boundary_f, garment, iou, logits_of
from worker.engine.postprocess import upsample
from worker.engine.refine import GuidedParams, guide_of, guided, matte, matte_region
from worker.engine.types import Wanted

METHODS = ("bilinear", "guided", "matting")


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"boundary_f_1px": boundary_f(pred, truth, 1), "boundary_f_2px": boundary_f(pred, truth, 2),
            "iou": iou(pred, truth)}


def refined(g, device: torch.device) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Each method's binary prediction (threshold 0.5) of one garment."""
    height, width = g.truth.shape
    logits = logits_of(g.coarse).to(device)
    plain, _ = upsample(logits, prompts=["garment"], height=height, width=width, threshold=0.5)
    sharp, _ = upsample(logits, prompts=["garment"], height=height, width=width, threshold=0.5,
                        wanted=Wanted(soft=True), guide=guide_of(g.image, device=device))
    mask = sharp[0].mask > 0
    region = matte_region(mask)
    alpha = matte(g.image, mask, region) if region is not None else sharp[0].soft
    assert alpha is not None
    return {"bilinear": plain[0].mask > 0, "guided": mask, "matting": alpha >= 128}


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm: allocations, kernels, numba's compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def costs(device: torch.device, labels: int, repeats: int, engine_model: str | None) -> dict[str, float]:
    """ms per 1024x1536 image with `labels` labels: upsampling alone (masks and soft maps), with the
    guided filter, the mattes of every label; and the engine pass on the same picture."""
    gs = [garment(200 + i) for i in range(labels)]
    image = gs[0].image
    height, width = gs[0].truth.shape
    logits = torch.cat([logits_of(g.coarse) for g in gs]).to(device)
    wanted = Wanted(soft=True)
    names = [f"label{i}" for i in range(labels)]

    def plain() -> None:
        upsample(logits, prompts=names, height=height, width=width, threshold=0.5, wanted=wanted)

    def sharp() -> None:
        upsample(logits, prompts=names, height=height, width=width, threshold=0.5, wanted=wanted,
                 guide=guide_of(image, device=device))

    masks, _ = upsample(logits, prompts=names, height=height, width=width, threshold=0.5, wanted=wanted,
                        guide=guide_of(image, device=device))
    regions = [(m.mask > 0, matte_region(m.mask > 0)) for m in masks]

    def mattes() -> None:
        for mask, region in regions:
            if region is not None:
                matte(image, mask, region)

    out = {"upsample_ms": timed(plain, repeats), "guided_ms": timed(sharp, repeats),
           "matting_ms": timed(mattes, max(1, repeats // 3)),
           "matted_pixels": float(sum(r.pixels for _, r in regions if r is not None))}
    out["guided_extra_ms"] = out["guided_ms"] - out["upsample_ms"]
    if engine_model is not None:
        from bench.engine import model_path
        from worker.engine import FastEngine, load_clipseg

        loaded = load_clipseg(model_path(engine_model), device=str(device), dtype="bf16" if device.type == "cuda"
                              else "fp32")
        engine = FastEngine(loaded)
        prompts = ["shirt", "pants", "dress", "shoes"][:labels] + [f"label {i}" for i in range(labels - 4)]
        out["engine_ms"] = timed(lambda: engine.batch_logits([image], [prompts]), repeats)
    return out


def pictures(out: Path, device: torch.device, seed: int = 3) -> Path:
    """A cutout's edge, zoomed, over a checkerboard: bilinear | guided | matting, side by side."""
    from PIL import Image, ImageDraw

    g = garment(seed)
    height, width = g.truth.shape
    logits = logits_of(g.coarse).to(device)
    plain, _ = upsample(logits, prompts=["g"], height=height, width=width, threshold=0.5, wanted=Wanted(soft=True))
    sharp, _ = upsample(logits, prompts=["g"], height=height, width=width, threshold=0.5, wanted=Wanted(soft=True),
                        guide=guide_of(g.image, device=device))
    region = matte_region(sharp[0].mask > 0)
    assert region is not None and plain[0].soft is not None and sharp[0].soft is not None
    alphas = [plain[0].soft, sharp[0].soft, matte(g.image, sharp[0].mask > 0, region)]
    # the crop: a 160x160 window centred on a stretch of true outline near the garment's top left
    ys, xs = np.nonzero(g.truth)
    cy, cx = int(np.percentile(ys, 20)), int(np.percentile(xs, 15))
    row = np.flatnonzero(g.truth[cy])
    cx = int(row[0]) if row.size else cx
    y0, x0 = max(0, cy - 80), max(0, cx - 80)
    zoom = 3
    yy, xx = np.mgrid[0:160, 0:160]
    board = np.where(((yy // 10) + (xx // 10)) % 2 == 0, 200, 150).astype(np.float32)[..., None]
    tiles = []
    for name, alpha in zip(("none (bilinear)", "guided", "matting"), alphas, strict=True):
        a = alpha[y0:y0 + 160, x0:x0 + 160, None].astype(np.float32) / 255.0
        rgb = g.image[y0:y0 + 160, x0:x0 + 160].astype(np.float32)
        tile = Image.fromarray(np.clip(rgb * a + board * (1 - a) + 0.5, 0, 255).astype(np.uint8))
        tile = tile.resize((160 * zoom, 160 * zoom), Image.Resampling.NEAREST)
        ImageDraw.Draw(tile).rectangle((0, 0, 150, 22), fill=(255, 255, 255))
        ImageDraw.Draw(tile).text((6, 5), f"refine: {name}", fill=(0, 0, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (3 * 160 * zoom + 2 * 8, 160 * zoom), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * (160 * zoom + 8), 0))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "refine-cutout-edge.png"
    sheet.save(path, optimize=True)
    return path


def sweep(device: torch.device) -> None:
    """The parameter search behind refine.py's choices, on the tuning seeds (100-105)."""
    gs = [garment(s) for s in range(100, 106)]
    for radius in (8, 16, 32, 46, 64, 96):
        for eps in (1e-4, 1e-3, 1e-2):
            rows = []
            for g in gs:
                height, width = g.truth.shape
                prob = torch.nn.functional.interpolate(logits_of(g.coarse)[None].to(device), size=(height, width),
                                                       mode="bilinear", align_corners=False)[0].sigmoid()
                subsample = max(1, min(round(max(height, width) / 192), radius))
                q = guided(prob, guide_of(g.image, device=device), GuidedParams(radius, eps, subsample))
                rows.append(score(q[0].cpu().numpy() >= 0.5, g.truth))
            mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
            print(f"radius {radius:3d}  eps {eps:g}  " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--labels", type=int, default=4, help="labels per image for the cost figures")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engine", default="full", help="model for the engine-pass figure: full | tiny | none")
    parser.add_argument("--sweep", action="store_true", help="the parameter search on the tuning seeds, then exit")
    parser.add_argument("--pictures", metavar="DIR", help="write the before/after cutout edge picture there, then exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if args.sweep:
        sweep(device)
        return 0
    if args.pictures:
        print(pictures(Path(args.pictures), device))
        return 0
    scores: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    started = time.perf_counter()
    for seed in range(args.images):
        g = garment(seed)
        for method, pred in refined(g, device).items():
            scores[method].append(score(pred, g.truth))
        print(f"\r{seed + 1}/{args.images} images", end="", file=sys.stderr, flush=True)
    print(f"\rscored {args.images} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    means = {m: {k: round(statistics.mean(r[k] for r in rows), 4) for k in rows[0]} for m, rows in scores.items()}
    print(f"{args.images} synthetic garments, 1024x1536, threshold 0.5 ({device.type})")
    print(f"{'method':10s} {'boundary F 1px':>15s} {'boundary F 2px':>15s} {'IoU':>7s}")
    for method, m in means.items():
        print(f"{method:10s} {m['boundary_f_1px']:15.3f} {m['boundary_f_2px']:15.3f} {m['iou']:7.3f}")
    cost = costs(device, args.labels, args.repeats, None if args.engine == "none" else args.engine)
    print(f"\ncost per 1024x1536 image, {args.labels} labels, {torch.get_num_threads()} threads ({device.type}):")
    print(f"  upsample + threshold + soft maps (none): {cost['upsample_ms']:.1f} ms")
    print(f"  the same with the guided filter:         {cost['guided_ms']:.1f} ms (+{cost['guided_extra_ms']:.1f})")
    print(f"  mattes of the {args.labels} labels ({cost['matted_pixels'] / 1e6:.2f} Mpx solved): "
          f"{cost['matting_ms']:.0f} ms")
    if "engine_ms" in cost:
        print(f"  the engine pass ({args.engine} architecture): {cost['engine_ms']:.1f} ms")
    if args.json:
        # each method's whole post-model cost (matting: the guided pass, then the mattes), and the engine's
        per_image = {"none": round(cost["upsample_ms"], 2), "guided": round(cost["guided_ms"], 2),
                     "matting": round(cost["guided_ms"] + cost["matting_ms"], 1)}
        if "engine_ms" in cost:
            per_image["engine"] = round(cost["engine_ms"], 1)
        print(json.dumps({"images": args.images, **means, "ms_per_image": per_image, "labels": args.labels,
                          "device": device.type}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
