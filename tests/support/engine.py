"""The engine tests' shared tolerances (stated in tests/worker/test_engine_equivalence.py), devices and
a photo-like test picture (and as a JPEG)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

PIXEL_TOL = 1e-4
IMAGE_MAX_TOL = 0.08
IMAGE_MEAN_TOL = 0.01
BF16_MAX_TOL = 0.1
BF16_MEAN_TOL = 0.01

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus blocks plus mild noise: photo-like statistics at any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / max(width, 1), yy / max(height, 1), (xx + yy) / (width + height)], axis=-1) * 200
    base[height // 4 : height // 2, width // 3 : 2 * width // 3] = rng.integers(0, 255, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg(width: int, height: int, *, seed: int = 0, orientation: int = 1, mode: str = "RGB",
         quality: int = 90) -> bytes:
    """`picture` as a JPEG, with an EXIF orientation tag unless it is 1, in another mode if asked."""
    img = picture(width, height, seed=seed)
    if mode != "RGB":
        img = img.convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()
