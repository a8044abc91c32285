"""What `clipmask finetune` writes: the model folder (manifest and weights, checked with
shared/modelfile.py's rules as the loader reads them) and the HTML report."""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.finetune.trainer import History, Settings, Trainer


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    return {"miou": summary["miou"], "mdice": summary["mdice"], "pixel_accuracy": summary["pixel_accuracy"],
            "classes": {name: {"iou": row["iou"], "mask_iou": row["mask_iou"], "best_threshold": row["best_threshold"]}
                        for name, row in summary["classes"].items()}}


def _base_id(source: str) -> str:
    """A hub id as given; a local folder as an absolute path, so the model folder loads from anywhere."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def write_folder(out: Path, trainer: Trainer, state: dict[str, Any], *, names: list[str], thresholds: dict[str, float],
                 settings: Settings, before: dict[str, Any], after: dict[str, Any], history: History,
                 timing: dict[str, Any], dataset: str, split: dict[str, int]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from shared.modelfile import FORMAT_VERSION, MANIFEST, WEIGHTS
    from worker.engine.finetuned import check_against, read_model_folder

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in state.items()}, str(out / WEIGHTS))
    manifest = {
        "format": FORMAT_VERSION,
        "base": {"id": _base_id(trainer.loaded.source), "revision": trainer.loaded.revision},
        "labels": [{"name": label.name, "prompts": list(label.phrasings), "threshold": thresholds[label.name]}
                   for label in trainer.labels],
        "prompt_tuning": settings.prompt_tuning,
        "training": {**asdict(settings), "dataset": str(dataset), **split, "epochs_run": len(history.loss),
                     "best_epoch": history.best_epoch, "stopped": history.stopped, **timing},
        "metrics": {"validation_before": _metrics(before), "validation_after": _metrics(after)},
        "history": {"loss": history.loss, "val_miou": history.val_miou},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(_finite(manifest), indent=2, allow_nan=False))
    # what was written passes the loader's checks, which are the uploader's (shared/modelfile.py): a
    # folder POST /v1/models would refuse is never left behind as if it were a model
    check_against(trainer.loaded.model, read_model_folder(out))
    return manifest


def _finite(value: Any) -> Any:
    """The manifest with NaN and infinities (a metric of a class validation never saw, a diverged run)
    as null: strict JSON, which the uploader requires."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(out: Path, manifest: dict[str, Any], history: History, before: dict[str, Any],
                 after: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    epochs = list(range(1, len(history.loss) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, history.loss, marker="o")
    left.set(title="training loss (BCE + Dice)", xlabel="epoch")
    right.plot(epochs, [np.nan if v is None else v for v in history.val_miou], marker="o", color="tab:green")
    right.axhline(before["miou"] or 0, color="grey", linestyle="--", label="before")
    right.set(title="validation mIoU", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    names = list(after["classes"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    ax.bar(x - 0.2, [before["classes"][n]["iou"] or 0 for n in names], 0.4, label="before")
    ax.bar(x + 0.2, [after["classes"][n]["iou"] or 0 for n in names], 0.4, label="after")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(title="validation IoU per class", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_class_iou.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in after["sweep"]["mask_iou"].items():
        ax.plot(after["sweep"]["thresholds"], [np.nan if v is None else v for v in curve], label=name)
    ax.set(title="after: each label's mask IoU by threshold", xlabel="threshold", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "threshold_sweep.png", dpi=100)
    plt.close(fig)

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(label['name'])}</td><td>{_f(before['classes'][label['name']]['iou'])}</td>"
        f"<td>{_f(after['classes'][label['name']]['iou'])}</td><td>{label['threshold']}</td></tr>"
        for label in manifest["labels"])
    training = manifest["training"]
    (out / "index.html").write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipmask finetune</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style>
</head><body>
<h1>clipmask finetune</h1>
<p>Base {e(manifest['base']['id'])}; {training['train']} training and {training['validation']} validation images
of {e(training['dataset'])}; {training['epochs_run']} epochs ({e(training['stopped'])}), best epoch
{training['best_epoch']}.</p>
<p>Validation mIoU {_f(before['miou'])} before, {_f(after['miou'])} after (threshold {training['threshold']}).</p>
<img src="curves.png" alt="loss and validation mIoU"><img src="per_class_iou.png" alt="IoU per class">
<img src="threshold_sweep.png" alt="threshold sweep">
<h2>Per class</h2><table><tr><th>class</th><th>IoU before</th><th>IoU after</th><th>calibrated threshold</th></tr>
{rows}</table></body></html>
""")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
