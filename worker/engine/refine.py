"""Crisp edges at full resolution (the job option `refine`).

- `guided`: an edge-aware upsampling of each label's probability map with the photo as guide, the
  guided filter of He et al. in its fast form (coefficients on a subsampled grid, applied at full
  resolution), through kornia's `guided_blur` on the model's device, in float32 (bf16 would band).
  Its output is what the masks, soft maps, cutouts, RLE, label map and overlay are made from.
- `matting`: for soft maps and cutouts, an alpha matte (pymatting's closed-form solver) on the CPU
  over a narrow band around the guided mask's outline (the trimap: inside and outside the band
  are known), bounded in pixels by the caller.

Parameters, chosen on synthetic garments that the benchmark's figures don't use (bench/refine.py,
bench/README.md), scale with the image:
- radius 2.5% of the diagonal (46 px at 1024x1536, about two thirds of a decoder token there: the
  distance over which the model's outline is uncertain). Wider windows score higher still on
  synthetic garments, which are one colour on one background; in a photo a wider window takes in
  other garments and skin, so the radius stops at the uncertainty;
- eps 1e-3 on a guide in [0, 1] (edges of less than about 8 grey levels of contrast are smoothed);
- coefficients on a grid of about 192 pixels along the longer side (as good as 4x finer, and faster).
No Celery, Flask, SQLAlchemy or boto3 here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine.jpeg import EncodedJpeg
from worker.engine.types import PromptMask, SegmentRequest

METHODS = ("none", "guided", "matting")
RADIUS_FRACTION = 0.025
EPS = 1e-3
COARSE_SIDE = 192
BAND_FRACTION = 0.0065  # the matting trimap's unknown band: this far either side of the outline (12 px at 1024x1536)


@dataclass(frozen=True)
class GuidedParams:
    radius: int  # pixels at full resolution
    eps: float
    subsample: int

    @classmethod
    def for_size(cls, height: int, width: int) -> GuidedParams:
        radius = max(1, round(RADIUS_FRACTION * math.hypot(height, width)))
        subsample = max(1, min(round(max(height, width) / COARSE_SIDE), radius))
        return cls(radius, EPS, subsample)


def request_guide(request: SegmentRequest, arr: np.ndarray | EncodedJpeg,
                  device: torch.device) -> torch.Tensor | None:
    """A request's guide on `device` at its output size, or None for `refine: none`. An image decoded
    smaller than the outputs (it shouldn't be: the runner decodes refined jobs in full) is brought up
    to their size."""
    if request.refine == "none":
        return None
    if request.refine not in METHODS:
        raise ValueError(f"unknown refine method {request.refine!r}")
    if isinstance(arr, EncodedJpeg):
        raise ValueError("a refined request needs the decoded image, not an EncodedJpeg")
    return guide_of(arr, device=device, size=request.output_size(arr))


def guide_of(image: np.ndarray, *, device: torch.device, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] on `device` from an (h, w, 3) uint8 photo; resized (bilinear,
    antialiased) to `size` = (width, height) if it isn't that size already."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=not image.flags.writeable, order="C"))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    t = t.to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if size is not None and (t.shape[-1], t.shape[-2]) != size:
        t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
    return t


def guided(prob: torch.Tensor, guide: torch.Tensor, params: GuidedParams | None = None) -> torch.Tensor:
    """(P, H, W) probabilities refined with the (1, 3, H, W) guide: (P, H, W) in [0, 1], float32."""
    from kornia.filters import guided_blur

    if prob.shape[-2:] != guide.shape[-2:]:
        raise ValueError(f"guide {tuple(guide.shape[-2:])} and maps {tuple(prob.shape[-2:])} differ in size")
    if prob.shape[0] == 0:
        return prob.float()
    p = params or GuidedParams.for_size(prob.shape[-2], prob.shape[-1])
    out = guided_blur(guide.float(), prob.float().unsqueeze(0), 2 * p.radius + 1, p.eps,
                      subsample=p.subsample, separable=True)
    return out[0].clamp_(0.0, 1.0)


# Values held per output pixel and label while `guided` runs (its full-resolution coefficients and
# their product with the guide): the caller bounds its chunks of labels with it.
GUIDED_VALUES_PER_PIXEL = 6


def band_px(height: int, width: int) -> int:
    return max(2, round(BAND_FRACTION * math.hypot(height, width)))


def _square_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The maximum over each (2r+1)-pixel square, as a row pass then a column pass (a square
    kernel's max pool is much slower at the band widths used here; bench/README.md)."""
    k = 2 * radius + 1
    rows = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, (k, 1), stride=1, padding=(radius, 0))


def trimap(mask: np.ndarray, band: int) -> np.ndarray:
    """(H, W) float64: 1 inside the mask, 0 outside, 0.5 within `band` pixels of its outline."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    grown, shrunk = _square_max(m, band), 1 - _square_max(1 - m, band)
    unknown = (grown - shrunk)[0, 0].numpy() > 0
    return np.where(unknown, 0.5, mask.astype(np.float64))


@dataclass(frozen=True)
class MatteRegion:
    """Where a label's matte is solved: the box (y0, y1, x0, x1) around its unknown band, and the
    trimap there; None when there is no outline to matte (an empty or full mask)."""

    box: tuple[int, int, int, int]
    trimap: np.ndarray

    @property
    def pixels(self) -> int:
        return self.trimap.size


def matte_region(mask: np.ndarray) -> MatteRegion | None:
    height, width = mask.shape
    band = band_px(height, width)
    tri = trimap(mask, band)
    unknown = tri == 0.5
    if not unknown.any():
        return None
    rows, cols = np.flatnonzero(unknown.any(axis=1)), np.flatnonzero(unknown.any(axis=0))
    y0, y1 = max(0, rows[0] - 2), min(height, rows[-1] + 3)
    x0, x1 = max(0, cols[0] - 2), min(width, cols[-1] + 3)
    crop = tri[y0:y1, x0:x1]
    if not (crop == 1).any() or not (crop == 0).any():  # the solver needs both known sides (a thin sliver)
        return None
    return MatteRegion((y0, y1, x0, x1), crop)


def warm_up() -> float:
    """Solve a tiny matte so that pymatting's numba kernels are compiled (or loaded from numba's
    cache) now rather than by a job: a cold compile takes about 75 s of one core on the dev machine,
    a cached load well under a second. Returns the seconds it took."""
    import time

    started = time.perf_counter()
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[:, 12:] = 200
    mask = np.zeros((24, 24), dtype=bool)
    mask[:, 12:] = True
    region = matte_region(mask)
    if region is not None:
        matte(image, mask, region)
    return time.perf_counter() - started


def matte(image: np.ndarray, mask: np.ndarray, region: MatteRegion) -> np.ndarray:
    """(H, W) uint8 alpha, round(255 a): the closed-form matte in the region, the mask elsewhere."""
    from pymatting import estimate_alpha_cf

    y0, y1, x0, x1 = region.box
    crop = image[y0:y1, x0:x1].astype(np.float64) / 255.0
    alpha = estimate_alpha_cf(crop, region.trimap)
    out = np.where(mask, 255, 0).astype(np.uint8)
    out[y0:y1, x0:x1] = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


class PixelBudget:
    """The pixels a worker process may be solving mattes for at once, shared by its job threads: the
    solver holds about 400 bytes per pixel, so a per-job bound alone let 16 threads ask for tens of
    GB. A matte waits until its pixels are free; one larger than the whole budget waits until it
    runs alone (the per-job bound keeps every matte below it in practice)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.in_use = 0
        self.peak = 0  # the most pixels held at once (benchmarks and tests read it)
        self._free = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._free:
            self._free.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._free:
                self.in_use -= pixels
                self._free.notify_all()


def apply_mattes(image: np.ndarray, masks: Sequence[PromptMask], *, max_pixels: int,
                 budget: PixelBudget | None = None) -> int:
    """refine: matting, after the guided pass - each label's soft map (and so its cutout) becomes the
    alpha matte around its guided mask's outline, labels in order while the pixels solved stay
    within `max_pixels`; a label past the bound, or with no outline to matte, keeps its guided soft
    map (and says refine: guided). Binary masks, RLE and the label map stay guided. Each matte is
    solved within the process's `budget`, waiting for its pixels. Returns the pixels solved."""
    solved = 0
    for item in masks:
        if item.soft is None:
            continue
        mask = item.mask > 0
        region = matte_region(mask)
        if region is None or solved + region.pixels > max_pixels:
            continue
        with budget.hold(region.pixels) if budget is not None else nullcontext():
            item.soft = matte(image, mask, region)
        item.refine = "matting"
        solved += region.pixels
    return solved


def refine_map(image: np.ndarray, coarse: np.ndarray, method: str, *, device: torch.device | None = None,
               max_matte_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """A coarse probability map from any source ((h, w) uint8, 255 = certain) refined with the
    (H, W, 3) photo's edges: (the refined map as (H, W) uint8 round(255 p), the method applied).
    Bilinear to the photo's size, then what a job's labels get: the guided filter, and for
    `matting` the matte around the guided mask's outline (p >= 0.5). A matte larger than
    `max_matte_pixels`, or with no outline, falls back to the guided map."""
    if method not in ("guided", "matting"):
        raise ValueError(f"unknown refine method {method!r}: guided or matting")
    device = device or torch.device("cpu")
    height, width = image.shape[:2]
    prob = torch.from_numpy(coarse.astype(np.float32) / 255.0).to(device)[None, None]
    prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    out = guided(prob, guide_of(image, device=device))[0]
    soft = (out * 255).round_().to(torch.uint8).cpu().numpy()
    if method == "guided":
        return soft, "guided"
    mask = soft >= 128  # p >= 0.5
    region = matte_region(mask)
    if region is None or (max_matte_pixels is not None and region.pixels > max_matte_pixels):
        return soft, "guided"
    return matte(image, mask, region), "matting"
