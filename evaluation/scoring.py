"""Segmentation metrics and dataset statistics, accumulated image by image in fixed memory.

Predictions are the soft masks the service returns (`soft`: round(255 * p) per label), so the
in-process engine and a deployment are scored the same way, and a threshold t keeps the pixels
with soft >= round(255 * t) (p >= t, to 1/255).

Two views of the same predictions:
- **the label map** (what `label_map` returns): each pixel gets the most probable label reaching
  the threshold, else background, competing among every label the job would have (a preset's
  labels that the dataset does not have included: a pixel one of them wins is background here).
  Per class IoU, Dice, precision and recall from its confusion matrix, and from it mIoU and mDice
  (over the classes with ground-truth pixels in the evaluated images, and with background), pixel
  accuracy and frequency-weighted IoU: the usual human-parsing metrics. A class with no ground
  truth in the evaluated images is not averaged (its false positives still show in its row and in
  pixel accuracy), whatever the dataset's layout.
- **boundary F** per class on the label map (DAVIS/Cityscapes-style): the F1 of boundary precision
  (predicted boundary pixels within `tolerance` of a true boundary pixel) and boundary recall (the
  converse), with the tolerance BOUNDARY_TOLERANCE of the image diagonal (at least 1 px), distance
  measured as the larger of the x and y offsets; counts are summed over images.
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
BOUNDARY_TOLERANCE = 0.0075  # of the image diagonal: 14 px at 1024 x 1536, 2 px at 200 x 250
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


def boundary_tolerance_px(height: int, width: int, fraction: float = BOUNDARY_TOLERANCE) -> int:
    return max(1, round(fraction * float(np.hypot(height, width))))


def _shifted_or(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    out = mask.copy()
    n = mask.shape[axis]
    for step in range(1, min(radius, n - 1) + 1):
        lead = [slice(None)] * 2
        lag = [slice(None)] * 2
        lead[axis], lag[axis] = slice(step, None), slice(None, n - step)
        out[tuple(lead)] |= mask[tuple(lag)]
        out[tuple(lag)] |= mask[tuple(lead)]
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within `radius` (the larger of the x and y offsets) of a True pixel."""
    return _shifted_or(_shifted_or(mask, radius, 0), radius, 1)


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (the image's edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _dice(hits: float, truth: float, predicted: float) -> float | None:
    return _ratio(2 * hits, truth + predicted)


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
    """Accumulates predictions against truth for `classes` (truth index i + 1 is classes[i], 0 background).

    The soft masks added hold every label the job would have, `columns[i]` being classes[i]'s row
    (default: one row per class, in order); the others only compete in the label map."""

    def __init__(self, classes: list[str], threshold: float, worst_k: int = 5, *,
                 columns: list[int] | None = None, labels: int | None = None,
                 boundary_tolerance: float = BOUNDARY_TOLERANCE) -> None:
        self.classes = classes
        self.threshold = threshold
        self.worst_k = worst_k
        self.columns = list(range(len(classes))) if columns is None else columns
        self.labels = len(classes) if labels is None else labels
        self.to_class = np.zeros(self.labels + 1, dtype=np.int64)  # label-map value -> class index (0: none)
        for c, column in enumerate(self.columns):
            self.to_class[column + 1] = c + 1
        self.boundary_tolerance = boundary_tolerance
        self.boundary_counts = np.zeros((len(classes), 4), dtype=np.int64)  # pred, pred matched, truth, truth matched
        self.tolerances: list[int] = []
        k = len(classes) + 1
        self.confusion = np.zeros((k, k), dtype=np.int64)  # rows truth, columns prediction
        self.positive = np.zeros((len(classes), 256), dtype=np.int64)  # soft values on truth pixels
        self.negative = np.zeros((len(classes), 256), dtype=np.int64)  # soft values elsewhere
        self.images_with = np.zeros(len(classes), dtype=np.int64)
        self.images = 0
        self._worst: list[list[tuple[float, int, Worst]]] = [[] for _ in classes]
        self._tie = itertools.count()

    def add(self, name: str, truth: np.ndarray, soft: np.ndarray, image: Image.Image | None = None) -> None:
        """`truth`: (H, W) uint8, 0 background, i + 1 for classes[i], IGNORE; `soft`: (labels, H, W) uint8."""
        if soft.shape != (self.labels, *truth.shape):
            raise ValueError(f"{name}: soft masks {soft.shape} for truth {truth.shape} and {self.labels} labels")
        k = len(self.classes) + 1
        valid = truth != IGNORE
        pred = self.to_class[label_map(soft, self.threshold)]
        t, p = truth[valid].astype(np.int64), pred[valid]
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.images += 1
        self._boundaries(truth, pred, valid)
        at = cut(self.threshold)
        for c, column in enumerate(self.columns):
            values = soft[column][valid]
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
                    entry.thumbs = _thumbs(image, truth == c + 1, soft[column] >= at)
                item = (-iou, next(self._tie), entry)
                if len(heap) < self.worst_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heapreplace(heap, item)

    def _boundaries(self, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> None:
        height, width = truth.shape
        tolerance = boundary_tolerance_px(height, width, self.boundary_tolerance)
        self.tolerances.append(tolerance)
        present = set(np.unique(truth[valid]).tolist()) | set(np.unique(pred[valid]).tolist())
        for c in range(len(self.classes)):
            if c + 1 not in present:
                continue
            edge_pred = boundary(pred == c + 1) & valid
            edge_truth = boundary(truth == c + 1) & valid
            self.boundary_counts[c] += (
                int(edge_pred.sum()), int((edge_pred & dilate(edge_truth, tolerance)).sum()),
                int(edge_truth.sum()), int((edge_truth & dilate(edge_pred, tolerance)).sum()))

    def boundary_f(self, c: int) -> dict[str, float | None]:
        predicted, pred_hit, truth, truth_hit = (int(v) for v in self.boundary_counts[c])
        precision, recall = _ratio(pred_hit, predicted), _ratio(truth_hit, truth)
        f = None
        if precision is not None and recall is not None:
            f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        return {"boundary_f": f, "boundary_precision": precision, "boundary_recall": recall}

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
        return {"iou": _ratio(tp, tp + fp + fn), "dice": _dice(tp, tp + fn, tp + fp),
                "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}

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
                "iou": iou[i], "dice": _dice(hits[i], truth_px[i], pred_px[i]),
                "precision": _ratio(hits[i], pred_px[i]), "recall": _ratio(hits[i], truth_px[i]),
                **self.boundary_f(c),
                "support_pixels": int(truth_px[i]), "support_images": int(self.images_with[c]),
                "predicted_pixels": int(pred_px[i]), "in_mean": bool(truth_px[i] > 0),
                "mask_iou": at["iou"], "mask_dice": at["dice"], "mask_precision": at["precision"],
                "mask_recall": at["recall"],
                "best_threshold": best_t, "best_mask_iou": best_iou,
                "worst_images": [{"image": w.name, "mask_iou": round(w.iou, 4)} for w in self.worst(c)],
            }
        # averaged over the classes with ground truth in the evaluated images (and background, if any)
        present = [i for i in range(1, len(conf)) if truth_px[i] > 0]

        def mean(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None]
            return float(np.mean(kept)) if kept else None

        with_background = ([0] if truth_px[0] > 0 else []) + present
        return {
            "threshold": self.threshold, "images": self.images,
            "miou": mean([iou[i] for i in present]),
            "miou_with_background": mean([iou[i] for i in with_background]),
            "mdice": mean([_dice(hits[i], truth_px[i], pred_px[i]) for i in present]),
            "mean_boundary_f": mean([self.boundary_f(i - 1)["boundary_f"] for i in present]),
            "boundary_tolerance": {"fraction_of_diagonal": self.boundary_tolerance,
                                   "pixels": _spread([float(t) for t in self.tolerances])},
            "not_averaged": [self.classes[i - 1] for i in range(1, len(conf)) if truth_px[i] == 0],
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
