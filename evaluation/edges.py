"""Synthetic garments for measuring edges without model weights (bench/refine.py, the refine tests).

A picture is a garment-like shape with a detailed outline (a concave polygon of a couple of dozen
vertices, plus thin straps) filled with a shaded colour on a textured background, drawn at twice
the size and box-downsampled so its edge is anti-aliased like a photo's. Its true mask is exact.

The model's view is simulated the way CLIPSeg loses detail, with fixed parameters that no refine
method was tuned against: the true mask area-averaged to the decoder's token grid (22x22 for
352 / 16), brought back to 352x352 bilinearly, blurred (Gaussian, sigma 3 px at 352) and given
Gaussian noise (sigma 0.05), clipped to [0, 1]. That is the probability map a job's logits stand for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 1024, 1536  # a catalogue photo, portrait
GRID = 22  # CLIPSeg's token grid at 352 x 352 with 16-pixel patches
MODEL_SIZE = 352
BLUR_SIGMA = 3.0  # pixels at 352
NOISE_SIGMA = 0.05


@dataclass
class Garment:
    image: np.ndarray  # (H, W, 3) uint8
    truth: np.ndarray  # (H, W) bool
    coarse: np.ndarray  # (352, 352) float32 probability, the simulated model's view


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
             vertices: int) -> list[tuple[float, float]]:
    """A star-shaped concave polygon: radii jittered between 0.55 and 1.0 of the ellipse."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = rng.uniform(0.55, 1.0, vertices)
    return [(cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A background of a base colour with low-frequency shading, fine noise and faint stripes."""
    base = rng.uniform(40, 215, 3)
    low = rng.normal(0, 1, (8, 6, 3)).astype(np.float32)
    shading = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0 - 0.5
    fine = rng.normal(0, 9, (height, width, 1)).astype(np.float32)
    period = rng.uniform(12, 40)
    stripes = 10 * np.sin(np.arange(width, dtype=np.float32) * 2 * math.pi / period)[None, :, None]
    return np.clip(base + 50 * shading + fine + stripes, 0, 255)


def draw(seed: int, *, width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, true mask (H, W) bool) of one synthetic garment."""
    rng = np.random.default_rng(seed)
    scale = 2  # drawn at twice the size, then box-downsampled: anti-aliased edges
    big_w, big_h = width * scale, height * scale
    canvas = Image.new("L", (big_w, big_h), 0)
    pen = ImageDraw.Draw(canvas)
    cx, cy = big_w * rng.uniform(0.4, 0.6), big_h * rng.uniform(0.4, 0.6)
    rx, ry = big_w * rng.uniform(0.22, 0.36), big_h * rng.uniform(0.18, 0.3)
    pen.polygon(_polygon(rng, cx, cy, rx, ry, int(rng.integers(20, 28))), fill=255)
    for _ in range(int(rng.integers(1, 4))):  # straps: thin bands from the body outwards
        angle = rng.uniform(-math.pi, 0)  # upwards, like shoulder straps
        length = rng.uniform(0.6, 1.1) * max(rx, ry)
        start = (cx + 0.5 * rx * math.cos(angle), cy + 0.5 * ry * math.sin(angle))
        end = (start[0] + length * math.cos(angle), start[1] + length * math.sin(angle))
        pen.line([start, end], fill=255, width=int(rng.integers(8, 24)) * scale // 2)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    cover = big.reshape(height, scale, width, scale).mean(axis=(1, 3))  # the fraction of each pixel covered
    truth = cover >= 0.5
    background = _texture(rng, width, height)
    colour = rng.uniform(20, 235, 3)
    while np.abs(colour - background.mean(axis=(0, 1))).max() < 40:  # a garment that differs from its setting
        colour = rng.uniform(20, 235, 3)
    fabric = colour + rng.normal(0, 6, (height, width, 1))
    fabric += 25 * (np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None])  # soft shading
    image = background * (1 - cover[..., None]) + fabric * cover[..., None]
    picture = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(picture), truth


def coarse_view(truth: np.ndarray, rng: np.random.Generator, *, grid: int = GRID) -> np.ndarray:
    """The simulated model's (352, 352) probability map of a true mask (see the module's text)."""
    t = torch.from_numpy(truth.astype(np.float32))[None, None]
    tokens = F.adaptive_avg_pool2d(t, (grid, grid))
    back = F.interpolate(tokens, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
    radius = int(math.ceil(3 * BLUR_SIGMA))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x**2 / (2 * BLUR_SIGMA**2))
    kernel /= kernel.sum()
    back = F.pad(back, (radius,) * 4, mode="replicate")
    back = F.conv2d(F.conv2d(back, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    noisy = back[0, 0].numpy() + rng.normal(0, NOISE_SIGMA, (MODEL_SIZE, MODEL_SIZE))
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def garment(seed: int, *, width: int = WIDTH, height: int = HEIGHT) -> Garment:
    image, truth = draw(seed, width=width, height=height)
    return Garment(image, truth, coarse_view(truth, np.random.default_rng(10_000 + seed)))


def logits_of(coarse: np.ndarray) -> torch.Tensor:
    """(1, 352, 352) logits of a probability map, as the engine hands them to postprocess."""
    p = torch.from_numpy(coarse).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))[None]


def boundary_f(pred: np.ndarray, truth: np.ndarray, tolerance: int) -> float:
    """The F1 of boundary precision and recall at `tolerance` pixels (evaluation.scoring's boundary)."""
    from evaluation.scoring import boundary, dilate

    edge_pred, edge_truth = boundary(pred), boundary(truth)
    if not edge_pred.any() or not edge_truth.any():
        return float(edge_pred.any() == edge_truth.any())
    precision = float((edge_pred & dilate(edge_truth, tolerance)).sum() / edge_pred.sum())
    recall = float((edge_truth & dilate(edge_pred, tolerance)).sum() / edge_truth.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)
