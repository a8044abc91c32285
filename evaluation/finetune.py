"""`clipmask finetune DATASET --preset human_parsing --out DIR`: train CLIPSeg's decoder on a labelled set.

CLIP stays frozen; the decoder (FiLM, reductions, transformer blocks, transposed convolutions:
about 1.1M parameters in rd64) is trained, and with --prompt-tuning one conditional embedding per
label too, initialised from its ensembled phrasings. The recipe starts from the CLIPSeg paper's:
AdamW, learning rate 1e-3 with a cosine schedule to 1e-4, the model's 352x352 input, and a loss of
BCE plus Dice per label, so that rare classes are not drowned by background.

The dataset steers training as its statistics say:
- images are drawn with class-balanced weights (an image weighs as much as its rarest label is rare);
- each image has --variants augmentation variants: itself, its mirror (left_/right_ labels swapped),
  and crops at random scale that keep every labelled pixel, with colour jitter.

The frozen backbone dominates the cost and its output never changes for a given picture, so every
variant's extracted-layer activations are computed once, before the first epoch, and kept on the
CPU (in bf16 when the model's hidden size makes them large); each training step then runs the
decoder alone. A progress bar shows the loss and the validation mIoU; training stops early when the
validation mIoU has not improved for --patience epochs (past the first third of --epochs), and
Ctrl-C keeps the best checkpoint so far.

Writes DIR/clipmask-model.json, DIR/decoder.safetensors and DIR/report/index.html (see
shared/modelfile.py for the format and its checks). `clipmask eval DATASET --model DIR` then scores the
folder the way the worker would run it.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from evaluation.datasets import IGNORE, DatasetError, open_dataset
from evaluation.run import evaluated, model_labels
from evaluation.scoring import Scores, best_threshold

DEFAULT_THRESHOLD = 0.4


@dataclass
class Settings:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    lr_min: float = 1e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    variants: int = 4
    patience: int = 5
    prompt_tuning: bool = False
    threshold: float = DEFAULT_THRESHOLD
    device: str = "cpu"


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    val_miou: list[float | None] = field(default_factory=list)
    best_epoch: int = 0
    stopped: str = "ran every epoch"


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


class Trainer:
    """The decoder of a loaded base model, trained on cached activations."""

    def __init__(self, base: str, labels: list[Any], settings: Settings) -> None:
        import torch

        from worker.engine import FastEngine, load_clipseg
        from worker.engine.fast import ensemble

        self.torch = torch
        self.settings = settings
        self.loaded = load_clipseg(base, device=settings.device, dtype="fp32", cpu_dtype="fp32")
        self.model = self.loaded.model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.engine = FastEngine(self.loaded, text_cache_size=0)
        self.labels = labels
        with torch.no_grad():
            phrases = list(dict.fromkeys(p for label in labels for p in label.phrasings))
            embedded = self.engine._text_embeddings(phrases).float()
            row = {p: i for i, p in enumerate(phrases)}
            self.text_embeddings = torch.stack([ensemble(embedded[[row[p] for p in label.phrasings]])
                                                for label in labels])
        self.label_embeddings = torch.nn.Parameter(self.text_embeddings.clone(), requires_grad=settings.prompt_tuning)
        self.decoder = self.model.decoder
        for param in self.decoder.parameters():
            param.requires_grad_(True)
        pre = self.loaded.preprocessing
        self.input_size = (pre.width, pre.height)
        hidden = self.model.config.vision_config.hidden_size
        self.cache_dtype = torch.bfloat16 if hidden >= 512 else torch.float32

    # ---- the frozen part, once ------------------------------------------------------------------
    def activations(self, image: Image.Image) -> list[Any]:
        torch = self.torch
        with torch.no_grad():
            pixels = self.engine.preprocess([np.asarray(image.convert("RGB"))])
            return [a.to("cpu", self.cache_dtype) for a in self.engine.activations(pixels)]

    def output_size(self) -> tuple[int, int]:
        torch = self.torch
        with torch.no_grad():
            probe = self.activations(Image.new("RGB", self.input_size))
            logits = self.decode(probe, [0], self.label_embeddings[:1])
        return int(logits.shape[-1]), int(logits.shape[-2])

    def decode(self, cached: list[Any], images: list[int] | None = None, conditional: Any = None) -> Any:
        """Logits (images x labels, h, w) for cached activations (a list per layer, batch first)."""
        torch = self.torch
        conditional = self.label_embeddings if conditional is None else conditional
        acts = [a.to(self.loaded.device, torch.float32) for a in cached]
        batch = acts[0].shape[0]
        labels = conditional.shape[0]
        index = torch.arange(batch, device=self.loaded.device).repeat_interleave(labels)
        cond = conditional.to(self.loaded.device).repeat(batch, 1)
        return self.engine._decode(acts, cond, index)

    # ---- the loss -------------------------------------------------------------------------------
    def loss(self, logits: Any, targets: Any, valid: Any) -> Any:
        """BCE over valid pixels plus soft Dice per label, averaged."""
        torch = self.torch
        F = torch.nn.functional
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        bce = (bce * valid).sum() / valid.sum().clamp(min=1)
        probs = torch.sigmoid(logits) * valid
        inter = (probs * targets).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (probs.sum(dim=(1, 2)) + (targets * valid).sum(dim=(1, 2)) + 1)
        return bce + dice.mean()


def _targets(truths: list[np.ndarray], labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(images x labels, h, w) float targets and validity for truths of label indices."""
    stacked = np.stack(truths)
    targets = (stacked[:, None] == np.arange(1, labels + 1)[None, :, None, None]).astype(np.float32)
    valid = np.repeat((stacked != IGNORE)[:, None], labels, axis=1).astype(np.float32)
    return targets.reshape(-1, *stacked.shape[1:]), valid.reshape(-1, *stacked.shape[1:])


def _soft(trainer: Trainer, cached: list[Any], size: tuple[int, int]) -> np.ndarray:
    """(labels, H, W) uint8 round(255 p) at the image's size, as the service's `soft` gives it."""
    torch = trainer.torch
    with torch.no_grad():
        logits = trainer.decode(cached)
        up = torch.nn.functional.interpolate(logits[None].float(), size=(size[1], size[0]), mode="bilinear",
                                             align_corners=False)[0]
        return torch.sigmoid(up).mul(255).round().to(torch.uint8).cpu().numpy()


def validate(trainer: Trainer, val: list[tuple[str, list[Any], np.ndarray, Image.Image]],
             threshold: float) -> Scores:
    scores = Scores([label.name for label in trainer.labels], threshold)
    for name, cached, truth, image in val:
        scores.add(name, truth, _soft(trainer, cached, (truth.shape[1], truth.shape[0])), image)
    return scores


def train(dataset_path: str, *, preset: str | None, prompts: list[str], base: str, out: Path,
          settings: Settings, progress: bool = True, limit: int | None = None) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    dataset = open_dataset(dataset_path)
    asked = model_labels(preset, prompts)
    labels, lookup = evaluated(asked, dataset)
    names = [label.name for label in labels]
    trainer = Trainer(base, labels, settings)
    mirror = mirror_lookup(names)
    out_w, out_h = trainer.output_size()

    samples = []
    for i, sample in enumerate(dataset):
        if limit and i >= limit:
            break
        samples.append((sample.name, sample.image, lookup[sample.truth]))
    if len(samples) < 2:
        raise DatasetError(f"{dataset_path}: fine-tuning needs at least 2 labelled images, found {len(samples)}")
    order = list(range(len(samples)))
    random.Random(settings.seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(settings.val_fraction * len(samples))))
    val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])

    # the frozen backbone, once per image and variant
    started = time.perf_counter()
    train_items: list[tuple[list[Any], np.ndarray]] = []
    presence = np.zeros((len(train_ids), len(labels)), dtype=bool)
    with tqdm(total=len(train_ids) * settings.variants + len(val_ids), desc="backbone", unit="img",
              disable=not progress, file=sys.stderr) as bar:
        for row, i in enumerate(train_ids):
            _, image, truth = samples[i]
            present = np.unique(truth)
            presence[row] = [(c + 1) in present for c in range(len(labels))]
            for k in range(settings.variants):
                picture, target = variant(image, truth, k, rng, mirror)
                resized = picture.resize(trainer.input_size, Image.Resampling.BILINEAR)
                train_items.append((trainer.activations(resized), _resize_truth(target, (out_w, out_h))))
                bar.update()
        val = []
        for i in val_ids:
            name, image, truth = samples[i]
            val.append((name, trainer.activations(image.resize(trainer.input_size, Image.Resampling.BILINEAR)),
                        truth, image))
            bar.update()
    backbone_s = time.perf_counter() - started
    cache_bytes = sum(a.numel() * a.element_size() for acts, _ in train_items[:1] for a in acts)

    # class-balanced sampling: an image weighs as much as its rarest label is rare
    frequency = presence.mean(axis=0).clip(min=1 / max(1, len(train_ids)))
    weights = np.array([max([1 / frequency[c] for c in np.flatnonzero(p)] or [1.0]) for p in presence])
    item_weights = torch.tensor(np.repeat(weights, settings.variants), dtype=torch.float64)

    before = validate(trainer, val, settings.threshold).summary()
    params = [p for p in trainer.decoder.parameters()] + ([trainer.label_embeddings] if settings.prompt_tuning else [])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_items) / settings.batch_size))
    total_steps = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps),
                                                          eta_min=settings.lr_min)
    history = History()
    best_miou, best_state = -1.0, None

    def snapshot() -> dict[str, Any]:
        state = {f"decoder.{k}": v.detach().clone() for k, v in trainer.decoder.state_dict().items()}
        if settings.prompt_tuning:
            state["label_embeddings"] = trainer.label_embeddings.detach().clone()
        return state

    started = time.perf_counter()
    images_seen = 0
    try:
        with tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress, file=sys.stderr) as bar:
            for epoch in range(settings.epochs):
                trainer.decoder.train()
                drawn = torch.multinomial(item_weights, len(train_items), replacement=True).tolist()
                losses = []
                for start in range(0, len(drawn), settings.batch_size):
                    batch = [train_items[j] for j in drawn[start:start + settings.batch_size]]
                    acts = [torch.cat([item[0][layer] for item in batch]) for layer in range(len(batch[0][0]))]
                    targets, valid = _targets([item[1] for item in batch], len(labels))
                    logits = trainer.decode(acts)
                    loss = trainer.loss(logits, torch.from_numpy(targets).to(logits.device),
                                        torch.from_numpy(valid).to(logits.device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
                    images_seen += len(batch)
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}",
                                    val_miou=f"{history.val_miou[-1]:.3f}" if history.val_miou and
                                    history.val_miou[-1] is not None else "-")
                trainer.decoder.eval()
                miou = validate(trainer, val, settings.threshold).summary()["miou"]
                history.loss.append(float(np.mean(losses)))
                history.val_miou.append(miou)
                if miou is not None and miou > best_miou:
                    best_miou, best_state, history.best_epoch = miou, snapshot(), epoch + 1
                elif epoch + 1 - history.best_epoch >= settings.patience and epoch + 1 >= settings.epochs // 3:
                    # (not in the first third: a decoder fresh on new data often dips before it climbs)
                    history.stopped = f"early stop: no better validation mIoU for {settings.patience} epochs"
                    break
    except KeyboardInterrupt:
        history.stopped = "interrupted (Ctrl-C): the best checkpoint so far is kept"
        print(f"\nclipmask finetune: {history.stopped}", file=sys.stderr)
    train_s = time.perf_counter() - started
    if best_state is None:
        best_state = snapshot()
    trainer.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in best_state.items()
                                     if k.startswith("decoder.")})
    if "label_embeddings" in best_state:
        trainer.label_embeddings.data.copy_(best_state["label_embeddings"])
    trainer.decoder.eval()
    after_scores = validate(trainer, val, settings.threshold)
    after = after_scores.summary()
    thresholds = {}
    for name, curve in after["sweep"]["mask_iou"].items():
        _, best_t = best_threshold(curve)
        thresholds[name] = best_t if best_t is not None else settings.threshold

    timing = {"backbone_seconds": round(backbone_s, 2), "train_seconds": round(train_s, 2),
              "train_images_per_s": round(images_seen / train_s, 1) if train_s else None,
              "activation_cache_bytes_per_image": int(cache_bytes),
              "activation_cache_dtype": str(trainer.cache_dtype).removeprefix("torch.")}
    manifest = write_folder(out, trainer, best_state, names=names, thresholds=thresholds, settings=settings,
                            before=before, after=after, history=history, timing=timing, dataset=dataset_path,
                            split={"train": len(train_ids), "validation": len(val_ids)})
    write_report(out / "report", manifest, history, before, after)
    return manifest


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


def run(args: argparse.Namespace) -> int:
    from shared.settings import Settings as Deployment

    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
                        seed=args.seed, variants=args.variants, patience=args.patience,
                        prompt_tuning=args.prompt_tuning, threshold=args.threshold, device=args.device)
    if not 0 < settings.val_fraction < 1 or settings.epochs < 1 or settings.batch_size < 1 or settings.variants < 1:
        print("clipmask finetune: --val-fraction is between 0 and 1; --epochs, --batch-size and --variants are "
              "at least 1", file=sys.stderr)
        return 2
    try:
        manifest = train(args.dataset, preset=args.preset, prompts=args.prompt or [],
                         base=args.model or Deployment().model, out=Path(args.out), settings=settings,
                         progress=not args.quiet, limit=args.limit)
    except DatasetError as exc:
        print(f"clipmask finetune: {exc}", file=sys.stderr)
        return 2
    before = manifest["metrics"]["validation_before"]["miou"]
    after = manifest["metrics"]["validation_after"]["miou"]
    training = manifest["training"]
    print(f"validation mIoU {_f(before)} -> {_f(after)} ({training['validation']} images; "
          f"{training['epochs_run']} epochs, {training['stopped']})")
    print(f"training: {training['train_images_per_s']} images/s on the decoder, backbone cached in "
          f"{training['backbone_seconds']} s ({training['activation_cache_bytes_per_image']} bytes an image)")
    print("thresholds: " + ", ".join(f"{label['name']} {label['threshold']}" for label in manifest["labels"]))
    print(f"model: {Path(args.out)} (clipmask eval DATASET --model {args.out}); report: "
          f"{Path(args.out) / 'report' / 'index.html'}")
    return 0


def add_command(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune CLIPSeg's decoder on a labelled dataset (CLIP stays frozen)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a folder (images/, masks/, labels.json) or parquet file(s), as clipmask eval reads")
    p.add_argument("--preset", help="a built-in preset (human_parsing, clothing) or a JSON file of labels")
    p.add_argument("--prompt", action="append", help="a text label (repeatable); its name must be in labels.json")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--model", help="the base: hub id or folder (default: CLIPMASK_MODEL, else "
                                   "CIDAS/clipseg-rd64-refined)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=int, default=4, help="augmentation variants per image (1: none)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation mIoU before stopping")
    p.add_argument("--prompt-tuning", action="store_true", help="also learn one conditional embedding per label")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda args, settings: run(args))
