"""The report folder: metrics.json, per_class.csv, PNG plots and index.html showing them."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evaluation.scoring import SWEEP, DatasetStats, Scores

PLOTS = ("per_class_iou.png", "threshold_sweep.png", "class_frequency.png", "spatial_priors.png",
         "image_sizes.png")
CSV_COLUMNS = ("class", "iou", "dice", "precision", "recall", "boundary_f", "boundary_precision", "boundary_recall",
               "support_pixels", "support_images", "predicted_pixels", "in_mean",
               "mask_iou", "mask_dice", "mask_precision", "mask_recall", "best_threshold", "best_mask_iou")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(out: Path, metrics: dict[str, Any], scores: Scores, stats: DatasetStats) -> list[Path]:
    """Everything under `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "per_class.csv"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_plain) + "\n")
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for name, row in metrics["classes"].items():
            writer.writerow([name, *(_cell(row[c]) for c in CSV_COLUMNS[1:])])
    plt = _pyplot()
    try:
        written += _plots(plt, out, metrics, stats)
        written += _worst(out, scores)
    finally:
        plt.close("all")
    (out / "index.html").write_text(_html(metrics, written, out))
    written.append(out / "index.html")
    return written


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plots(plt: Any, out: Path, metrics: dict[str, Any], stats: DatasetStats) -> list[Path]:
    classes = list(metrics["classes"])
    rows = metrics["classes"]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) + 2), 4))
    x = np.arange(len(classes))
    ax.bar(x - 0.2, [rows[c]["iou"] or 0 for c in classes], 0.4, label="label map IoU")
    ax.bar(x + 0.2, [rows[c]["best_mask_iou"] or 0 for c in classes], 0.4, label="own mask, best threshold")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(f"IoU per class (mIoU {_fmt(metrics['miou'])} at threshold {metrics['threshold']})")
    ax.legend()
    paths.append(_save(fig, out / "per_class_iou.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in classes:
        curve = [np.nan if v is None else v for v in metrics["sweep"]["mask_iou"][name]]
        ax.plot(SWEEP, curve, marker=".", label=name)
    ax.axvline(metrics["threshold"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("threshold")
    ax.set_ylabel("IoU of the label's own mask")
    ax.set_ylim(0, 1)
    ax.set_title("IoU against threshold")
    ax.legend(fontsize="small", ncol=2 if len(classes) > 8 else 1)
    paths.append(_save(fig, out / "threshold_sweep.png"))

    eda = metrics["dataset"]["classes"]
    names = list(eda)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(names) + 4), 4))
    left.bar(names, [eda[n]["pixel_fraction"] for n in names])
    left.set_title("share of pixels")
    right.bar(names, [eda[n]["images"] for n in names])
    right.set_title("images containing the class")
    for ax in (left, right):
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    paths.append(_save(fig, out / "class_frequency.png"))

    shown = [(value, name) for value, name in sorted(stats.labels.items()) if stats.images_with[value]]
    cols = min(6, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (value, name) in zip(axes.ravel(), shown, strict=False):
        ax.imshow(stats.prior_of(value), cmap="magma", vmin=0, vmax=1, extent=(0, 1, 1, 0))
        ax.set_title(name, fontsize="small")
    fig.suptitle("where each class lies (fraction of its images, normalised coordinates)")
    paths.append(_save(fig, out / "spatial_priors.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    sizes = np.asarray(stats.sizes, dtype=np.float64).reshape(-1, 2)
    left.hist(sizes[:, 0] * sizes[:, 1] / 1e6, bins=20)
    left.set_xlabel("megapixels")
    left.set_title("image size")
    right.hist(sizes[:, 0] / sizes[:, 1], bins=20)
    right.set_xlabel("width / height")
    right.set_title("aspect ratio")
    paths.append(_save(fig, out / "image_sizes.png"))
    return paths


def _worst(out: Path, scores: Scores) -> list[Path]:
    """Per class, its worst images side by side: the image, the truth, the label's own mask."""
    folder = out / "worst"
    paths = []
    for c, name in enumerate(scores.classes):
        for rank, entry in enumerate(scores.worst(c)):
            if entry.thumbs is None:
                continue
            image, truth, pred = entry.thumbs
            h, w = truth.shape
            canvas = np.zeros((h, 3 * w + 8, 3), dtype=np.uint8)
            canvas[:, :w] = image
            canvas[:, w + 4:2 * w + 4] = truth[..., None]
            canvas[:, 2 * w + 8:] = pred[..., None]
            folder.mkdir(exist_ok=True)
            path = folder / f"{_slug(name)}_{rank}.png"
            Image.fromarray(canvas).save(path)
            paths.append(path)
    return paths


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _tolerance(tolerance: dict[str, Any]) -> str:
    pixels = tolerance["pixels"]
    spread = "-" if pixels is None else (f"{pixels['min']:g} px" if pixels["min"] == pixels["max"]
                                         else f"{pixels['min']:g} to {pixels['max']:g} px")
    return f"{tolerance['fraction_of_diagonal']:g} of the image diagonal ({spread})"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _html(metrics: dict[str, Any], written: list[Path], out: Path) -> str:
    e = html.escape
    summary = [("images", metrics["images"]), ("images/s", _fmt(metrics["timing"]["images_per_s"])),
               ("mIoU", _fmt(metrics["miou"])), ("mIoU with background", _fmt(metrics["miou_with_background"])),
               ("mDice", _fmt(metrics["mdice"])), ("mean boundary F", _fmt(metrics["mean_boundary_f"])),
               ("boundary tolerance", _tolerance(metrics["boundary_tolerance"])),
               ("not in the means (no ground truth)", ", ".join(metrics["not_averaged"]) or "-"),
               ("pixel accuracy", _fmt(metrics["pixel_accuracy"])), ("frequency-weighted IoU", _fmt(metrics["fw_iou"])),
               ("threshold", metrics["threshold"]), ("predictions", metrics["predictor"]),
               ("labels", metrics["preset"] or "prompts")]
    head = "".join(f"<th>{e(c)}</th>" for c in CSV_COLUMNS)
    body = []
    for name, row in metrics["classes"].items():
        cells = "".join(f"<td>{e(_cell(row[c]))}</td>" for c in CSV_COLUMNS[1:])
        body.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    plots = "".join(f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(p.stem)}</figcaption></figure>'
                    for p in written if p.parent == out and p.suffix == ".png")
    worst = []
    for name, row in metrics["classes"].items():
        pics = [p for p in written if p.parent.name == "worst" and p.stem.rsplit("_", 1)[0] == _slug(name)]
        if not row["worst_images"]:
            continue
        items = ", ".join(f"{e(w['image'])} ({w['mask_iou']:.2f})" for w in row["worst_images"])
        imgs = "".join(f'<img src="worst/{e(p.name)}" alt="{e(p.stem)}">' for p in sorted(pics))
        worst.append(f"<h3>{e(name)}</h3><p>{items}</p><div class=strip>{imgs}</div>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipmask eval: {e(metrics['dataset']['path'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:.5em}}figure img{{max-width:560px}}.strip img{{margin-right:6px}}</style>
</head><body>
<h1>clipmask eval</h1>
<p>{e(metrics['dataset']['path'])}, {metrics['images']} images.</p>
<table>{''.join(f'<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>' for k, v in summary)}</table>
<h2>Per class</h2>
<p><i>iou, dice, precision, recall, boundary_*</i>: the label map (the most probable label reaching the
threshold, among every label the job would have). <i>boundary_f</i>: F1 of boundary pixels matched within
the boundary tolerance. <i>in_mean</i>: whether the class had ground truth in these images (else it is not
averaged into mIoU, mDice or boundary F).
<i>mask_*</i>: each label's own mask at the threshold; <i>best_threshold</i>: where its IoU peaks.</p>
<table><tr>{head}</tr>{''.join(body)}</table>
<h2>Plots</h2>{plots}
<h2>Worst images per class</h2><p>Image, truth, the label's own mask; its IoU in brackets.</p>{''.join(worst)}
</body></html>
"""
