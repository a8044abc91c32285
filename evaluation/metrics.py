"""Segmentation metrics and dataset statistics, accumulated image by image in fixed memory.

Predictions are the soft masks the service returns (`soft`: round(255 * p) per label), so the
in-process engine and a deployment are scored the same way, and a threshold t keeps the pixels
with soft >= round(255 * t) (p >= t, to 1/255).

Two views of the same predictions:
- **the label map** (what `label_map` returns): each pixel gets the most probable label reaching
  the threshold, else background. Per class IoU, precision and recall from its confusion matrix,
  and from it mIoU (over the evaluated classes, and with background), pixel accuracy and
  frequency-weighted IoU: the usual human-parsing metrics.
- **each label's own mask** (what `mask` returns): a binary IoU per class at every threshold of
  a sweep (from per-class histograms of soft values, exact on the 1/255 grid), so a user can pick
  `threshold` per label; the best threshold and its IoU.
Ground-truth labels the model is not asked about count as background; pixel value 255
(unless labels.json names it) is ignored.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from evaluation.datasets import IGNORE

SWEEP = [round(t, 2) for t in np.arange(0.05, 0.951, 0.05)]
PRIOR_SIZE = 64  # spatial priors on a 64x64 grid of normalised image coordinates
THUMB = 160  # worst-image thumbnails' longer side


def cut(threshold: float) -> int:
    """The soft value from which a pixel counts as in the mask at `threshold`."""
    return int(round(255 * threshold))


def label_map(soft: np.ndarray, threshold: float) -> np.ndarray:
    """(C, H, W) soft masks -> (H, W) 0 (background) or 1 + the most probable label reaching the
    threshold (ties keep the earlier label, as the service's label map does)."""
    if soft.shape[0] == 0:
        return np.zeros(soft.shape[1:], dtype=np.uint8)
    best = soft.argmax(axis=0)
    top = np.take_along_axis(soft, best[None], axis=0)[0]
    return np.where(top >= cut(threshold), best + 1, 0).astype(np.uint8)


def best_threshold(curve: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(best IoU, its threshold) of a sweep; on a plateau of equal IoUs, its middle threshold (the
    one farthest from both edges, so the least sensitive choice)."""
    scored = [v for v in curve if v is not None]
    if not scored:
        return None, None
    top = max(scored)
    plateau = [t for v, t in zip(curve, SWEEP, strict=True) if v is not None and v >= top - 1e-12]
    return top, plateau[len(plateau) // 2]


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


@dataclass(order=True)
class Worst:
    iou: float
    name: str = field(compare=False)
    thumbs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(compare=False, default=None)


class Scores:
    """Accumulates predictions against truth for `classes` (truth index i + 1 is classes[i], 0 background)."""

    def __init__(self, classes: list[str], threshold: float, worst_k: int = 5) -> None:
        self.classes = classes
        self.threshold = threshold
        self.worst_k = worst_k
        k = len(classes) + 1
        self.confusion = np.zeros((k, k), dtype=np.int64)  # rows truth, columns prediction
        self.positive = np.zeros((len(classes), 256), dtype=np.int64)  # soft values on truth pixels
        self.negative = np.zeros((len(classes), 256), dtype=np.int64)  # soft values elsewhere
        self.images_with = np.zeros(len(classes), dtype=np.int64)
        self.images = 0
        self._worst: list[list[tuple[float, int, Worst]]] = [[] for _ in classes]
        self._tie = itertools.count()

    def add(self, name: str, truth: np.ndarray, soft: np.ndarray, image: Image.Image | None = None) -> None:
        """`truth`: (H, W) uint8, 0 background, i + 1 for classes[i], IGNORE; `soft`: (C, H, W) uint8."""
        if soft.shape != (len(self.classes), *truth.shape):
            raise ValueError(f"{name}: soft masks {soft.shape} for truth {truth.shape} and {len(self.classes)} classes")
        k = len(self.classes) + 1
        valid = truth != IGNORE
        pred = label_map(soft, self.threshold)
        t, p = truth[valid].astype(np.int64), pred[valid].astype(np.int64)
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.images += 1
        at = cut(self.threshold)
        for c in range(len(self.classes)):
            values = soft[c][valid]
            is_c = t == c + 1
            self.positive[c] += np.bincount(values[is_c], minlength=256)
            self.negative[c] += np.bincount(values[~is_c], minlength=256)
            inside = int(is_c.sum())
            self.images_with[c] += inside > 0
            predicted = values >= at
            union = int((predicted | is_c).sum())
            if union == 0:
                continue  # neither there nor predicted: nothing to get wrong
            iou = int((predicted & is_c).sum()) / union
            entry = Worst(iou, name)
            heap = self._worst[c]
            if len(heap) < self.worst_k or -iou > heap[0][0]:
                if image is not None:
                    entry.thumbs = _thumbs(image, truth == c + 1, soft[c] >= at)
                item = (-iou, next(self._tie), entry)
                if len(heap) < self.worst_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heapreplace(heap, item)

    def worst(self, c: int) -> list[Worst]:
        return sorted(entry for _, _, entry in self._worst[c])

    def sweep(self) -> dict[str, list[float | None]]:
        """Each class's binary IoU at every threshold of SWEEP."""
        out: dict[str, list[float | None]] = {}
        for c, name in enumerate(self.classes):
            tail_pos = np.cumsum(self.positive[c][::-1])[::-1]  # tail[v] = pixels with soft >= v
            tail_neg = np.cumsum(self.negative[c][::-1])[::-1]
            total = int(self.positive[c].sum())
            row: list[float | None] = []
            for threshold in SWEEP:
                tp, fp = int(tail_pos[cut(threshold)]), int(tail_neg[cut(threshold)])
                row.append(_ratio(tp, tp + fp + (total - tp)))
            out[name] = row
        return out

    def binary(self, c: int, threshold: float) -> dict[str, float | None]:
        tp = int(self.positive[c][cut(threshold):].sum())
        fp = int(self.negative[c][cut(threshold):].sum())
        fn = int(self.positive[c].sum()) - tp
        return {"iou": _ratio(tp, tp + fp + fn), "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}

    def summary(self) -> dict[str, Any]:
        conf = self.confusion.astype(np.float64)
        truth_px, pred_px, hits = conf.sum(axis=1), conf.sum(axis=0), np.diag(conf)
        union = truth_px + pred_px - hits
        iou = [_ratio(hits[i], union[i]) for i in range(len(conf))]
        total = conf.sum()
        sweep = self.sweep()
        classes: dict[str, Any] = {}
        for c, name in enumerate(self.classes):
            i = c + 1
            curve = sweep[name]
            best_iou, best_t = best_threshold(curve)
            at = self.binary(c, self.threshold)
            classes[name] = {
                "iou": iou[i], "precision": _ratio(hits[i], pred_px[i]), "recall": _ratio(hits[i], truth_px[i]),
                "support_pixels": int(truth_px[i]), "support_images": int(self.images_with[c]),
                "predicted_pixels": int(pred_px[i]),
                "mask_iou": at["iou"], "mask_precision": at["precision"], "mask_recall": at["recall"],
                "best_threshold": best_t, "best_mask_iou": best_iou,
                "worst_images": [{"image": w.name, "mask_iou": round(w.iou, 4)} for w in self.worst(c)],
            }
        foreground = [v for v in iou[1:] if v is not None]
        everything = [v for v in iou if v is not None]
        return {
            "threshold": self.threshold, "images": self.images,
            "miou": float(np.mean(foreground)) if foreground else None,
            "miou_with_background": float(np.mean(everything)) if everything else None,
            "pixel_accuracy": _ratio(hits.sum(), total),
            "fw_iou": None if total == 0 else float(sum(truth_px[i] / total * (iou[i] or 0.0)
                                                        for i in range(len(conf)))),
            "background_iou": iou[0],
            "classes": classes,
            "sweep": {"thresholds": SWEEP, "mask_iou": sweep},
        }


def _thumbs(image: Image.Image, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST))
             for m in (truth, pred)]
    return small, masks[0], masks[1]


class DatasetStats:
    """The dataset's own statistics, over every label in labels.json (not only the evaluated ones)."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.labels = labels
        self.pixels = np.zeros(256, dtype=np.int64)
        self.images_with = np.zeros(256, dtype=np.int64)
        self.prior = np.zeros((256, PRIOR_SIZE, PRIOR_SIZE), dtype=np.float64)
        self.sizes: list[tuple[int, int]] = []

    def add(self, truth: np.ndarray) -> None:
        height, width = truth.shape
        self.sizes.append((width, height))
        counts = np.bincount(truth.ravel(), minlength=256)
        self.pixels += counts
        self.images_with += counts > 0
        grid = np.asarray(Image.fromarray(truth).resize((PRIOR_SIZE, PRIOR_SIZE), Image.Resampling.NEAREST))
        for value in np.flatnonzero(counts):
            if value in self.labels:
                self.prior[value] += grid == value

    def summary(self) -> dict[str, Any]:
        widths = [w for w, _ in self.sizes]
        heights = [h for _, h in self.sizes]
        return {
            "images": len(self.sizes),
            "classes": {name: {"value": value, "pixels": int(self.pixels[value]),
                               "pixel_fraction": float(self.pixels[value] / max(1, self.pixels.sum())),
                               "images": int(self.images_with[value])}
                        for value, name in sorted(self.labels.items())},
            "width": _spread(widths), "height": _spread(heights),
            "aspect_ratio": _spread([w / h for w, h in self.sizes]),
        }

    def prior_of(self, value: int) -> np.ndarray:
        """Where the label lies: the fraction of its images covering each normalised cell."""
        return self.prior[value] / max(1, int(self.images_with[value]))


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}
