"""The training set's augmentation: each image's variants (itself, its mirror with left_/right_
labels swapped, crops at random scale that keep every labelled pixel, with colour jitter)."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageEnhance

from evaluation.datasets import IGNORE


def mirror_lookup(names: list[str]) -> np.ndarray:
    """Truth value -> its value in the mirrored image: left_X and right_X swap (1 + label index)."""
    lookup = np.arange(256, dtype=np.uint8)
    index = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(names):
        for a, b in (("left_", "right_"), ("right_", "left_")):
            if name.startswith(a) and b + name[len(a):] in index:
                lookup[i + 1] = index[b + name[len(a):]] + 1
    return lookup


def variant(image: Image.Image, truth: np.ndarray, k: int, rng: random.Random,
            mirror: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Augmentation variant k of an image and its truth (label indices): 0 itself, 1 its mirror,
    2+ a crop at random scale that keeps every labelled pixel, maybe mirrored, colour-jittered."""
    if k == 0:
        return image, truth
    if k == 1 or rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        truth = mirror[truth[:, ::-1]]
    if k == 1:
        return image, np.ascontiguousarray(truth)
    height, width = truth.shape
    ys, xs = np.nonzero((truth > 0) & (truth != IGNORE))
    if len(xs):
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    else:
        x0, x1, y0, y1 = width // 4, 3 * width // 4, height // 4, 3 * height // 4
    left, top = rng.randint(0, x0), rng.randint(0, y0)
    right, bottom = rng.randint(x1, width), rng.randint(y1, height)
    image = image.crop((left, top, right, bottom))
    truth = truth[top:bottom, left:right]
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.75, 1.25))
    return image, np.ascontiguousarray(truth)


def _resize_truth(truth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(truth).resize(size, Image.Resampling.NEAREST), dtype=np.uint8)
