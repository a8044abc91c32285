"""`clipmask finetune`'s command: the dataset split and weighted, the epochs with early stopping
and Ctrl-C, then the folder and the report."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evaluation.datasets import DatasetError, open_dataset
from evaluation.finetune.augment import _resize_truth, mirror_lookup, variant
from evaluation.finetune.output import _f, write_folder, write_report
from evaluation.finetune.trainer import DEFAULT_THRESHOLD, History, Settings, Trainer, _targets, validate
from evaluation.run import evaluated, model_labels
from evaluation.scoring import best_threshold


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
