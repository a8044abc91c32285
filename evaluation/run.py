"""`clipmask eval DATASET --preset human_parsing --out report/`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from evaluation.datasets import IGNORE, Dataset, DatasetError, Sample, open_dataset
from evaluation.predict import ApiPredictor, EnginePredictor, Label, Predictor
from evaluation.report import write_report
from evaluation.scoring import DatasetStats, Scores
from shared.presets import BUILTIN


def model_labels(preset: str | None, prompts: list[str]) -> list[Label]:
    """The labels asked of the model: a built-in preset's or a JSON file's ([{"name", "prompts"}]),
    then each prompt as its own label, as a job would have them."""
    labels: list[Label] = []
    if preset is not None:
        if preset in BUILTIN:
            raw: Any = BUILTIN[preset]
        elif Path(preset).is_file():
            raw = json.loads(Path(preset).read_text())
        else:
            raise DatasetError(f"--preset {preset}: neither a built-in ({', '.join(BUILTIN)}) nor a JSON file")
        labels += [Label(str(item["name"]), [str(p) for p in item["prompts"]]) for item in raw]
    labels += [Label(p, [p]) for p in prompts]
    if not labels:
        raise DatasetError("give --preset or --prompt: the labels to evaluate")
    return labels


def evaluated(labels: list[Label], dataset: Dataset) -> tuple[list[Label], np.ndarray]:
    """The model's labels the dataset also has (by name), and a lookup from pixel value to truth
    index (0 background, i + 1 the i-th evaluated label, IGNORE)."""
    by_name = {name: value for value, name in dataset.labels.items()}
    kept = [label for label in labels if label.name in by_name]
    if not kept:
        raise DatasetError(f"none of the labels ({', '.join(label.name for label in labels)}) is in the "
                           f"dataset's labels ({', '.join(dataset.labels.values())})")
    lookup = np.zeros(256, dtype=np.uint8)  # labels the model isn't asked about count as background
    if IGNORE not in dataset.labels:
        lookup[IGNORE] = IGNORE
    for i, label in enumerate(kept):
        lookup[by_name[label.name]] = i + 1
    return kept, lookup


def evaluate(dataset: Dataset, predictor: Predictor, labels: list[Label], lookup: np.ndarray, *,
             threshold: float, batch: int, limit: int | None, progress: bool,
             asked: list[Label] | None = None) -> tuple[Scores, DatasetStats, float]:
    """`predictor` predicts every label in `asked` (default: `labels`), as the job would; `labels`,
    the ones the dataset has, are scored, the others compete in the label map."""
    asked = labels if asked is None else asked
    scores = Scores([label.name for label in labels], threshold, columns=[asked.index(label) for label in labels],
                    labels=len(asked))
    stats = DatasetStats(dataset.labels)
    total = min(len(dataset), limit) if limit else len(dataset)
    started = time.perf_counter()
    pending: list[Sample] = []

    def flush() -> None:
        for sample, soft in zip(pending, predictor.predict([s.image for s in pending]), strict=True):
            stats.add(sample.truth)
            scores.add(sample.name, lookup[sample.truth], soft, sample.image)
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=total, unit="img", desc="eval", disable=not progress, file=sys.stderr) as bar:
        for i, sample in enumerate(dataset):
            if limit and i >= limit:
                break
            pending.append(sample)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    return scores, stats, time.perf_counter() - started


def deployment_labels(base_url: str, api_key: str, model: str) -> list[Label]:
    """A model's own labels as the deployment lists them (GET /v1/models/{id})."""
    from client import Clipmask, ClipmaskError

    try:
        with Clipmask(base_url, api_key) as cm:
            found = cm.get_model(model)
    except ClipmaskError as exc:
        raise DatasetError(f"--model {model}: {exc}") from exc
    return [Label(str(label["name"]), [str(p) for p in label["prompts"]]) for label in found["labels"]]


def folder_labels(model: str | None) -> list[Label]:
    """A fine-tuned model folder's own labels (what a job naming it segments without prompts)."""
    from shared.modelfile import is_model_folder
    from worker.engine.finetuned import InvalidModel, read_model_folder

    if model is None or not is_model_folder(model):
        return []
    try:
        return [Label(label.name, label.prompts) for label in read_model_folder(model).labels]
    except InvalidModel as exc:
        raise DatasetError(f"--model {model}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    try:
        dataset = open_dataset(args.dataset)
        key = args.api_key or os.environ.get("CLIPMASK_API_KEY")
        if args.preset or args.prompt or not args.model:
            own = []
        elif args.api and key:  # a model the deployment serves (`clipmask models push`)
            own = deployment_labels(args.api, key, args.model)
        else:
            own = folder_labels(args.model)
        asked = own or model_labels(args.preset, args.prompt or [])
        labels, lookup = evaluated(asked, dataset)
    except DatasetError as exc:
        print(f"clipmask eval: {exc}", file=sys.stderr)
        return 2
    predictor: Predictor
    if args.api:
        if not key:
            print("clipmask eval: --api needs --api-key or CLIPMASK_API_KEY", file=sys.stderr)
            return 2
        preset = args.preset if args.preset in BUILTIN or args.preset is None else None
        if args.preset is not None and preset is None:
            print("clipmask eval: with --api, --preset is a built-in preset (a labels file stays on this machine);"
                  " give its labels as --prompt instead", file=sys.stderr)
            return 2
        predictor = ApiPredictor(args.api, key, preset=preset, prompts=args.prompt or [], labels=asked,
                                 threshold=args.threshold, parallel=args.batch, model=args.model, refine=args.refine)
    else:
        from shared.settings import Settings

        deployment = Settings()  # the worker's settings from the environment, as a deployment reads them
        predictor = EnginePredictor(args.model or deployment.model, asked, device=args.device or deployment.device,
                                    dtype=args.dtype or deployment.dtype,
                                    cpu_dtype=args.cpu_dtype or deployment.cpu_dtype, threshold=args.threshold,
                                    refine=args.refine, matting_max_pixels=deployment.matting_max_pixels)
    try:
        scores, stats, seconds = evaluate(dataset, predictor, labels, lookup, threshold=args.threshold,
                                          batch=args.batch, limit=args.limit, progress=not args.quiet, asked=asked)
    except DatasetError as exc:
        print(f"clipmask eval: {exc}", file=sys.stderr)
        return 2
    finally:
        predictor.close()
    metrics = scores.summary()
    metrics["dataset"] = {"path": str(args.dataset), **stats.summary()}
    metrics["predictor"] = predictor.description
    metrics["preset"] = args.preset
    metrics["refine"] = args.refine
    metrics["prompts"] = args.prompt or []
    metrics["skipped_labels"] = [label.name for label in asked if label not in labels]
    metrics["timing"] = {"seconds": seconds, "images_per_s": scores.images / seconds if seconds else None,
                         "model_seconds": predictor.seconds}
    out = Path(args.out)
    write_report(out, metrics, scores, stats)
    _print(metrics, out)
    if args.calibrate:
        write_calibration(Path(args.calibrate), metrics, labels)
        print(f"calibrated thresholds: {args.calibrate}")
    return 0


def write_calibration(path: Path, metrics: dict[str, Any], labels: list[Label]) -> None:
    """Each evaluated label's best threshold of the sweep (its own mask's IoU), as a preset's labels
    take them: [{"name", "prompts", "threshold"}]; a label never present keeps the run's threshold."""
    rows = []
    for label in labels:
        best = metrics["classes"][label.name]["best_threshold"]
        rows.append({"name": label.name, "prompts": label.phrasings,
                     "threshold": best if best is not None else metrics["threshold"],
                     "mask_iou_at_threshold": metrics["classes"][label.name]["best_mask_iou"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": metrics["predictor"], "dataset": metrics["dataset"]["path"],
                                "images": metrics["images"], "labels": rows}, indent=2))


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print(metrics: dict[str, Any], out: Path) -> None:
    rows = [[name, _f(r["iou"]), _f(r["dice"]), _f(r["precision"]), _f(r["recall"]), _f(r["boundary_f"]),
             r["support_pixels"], r["support_images"], _f(r["mask_iou"]), r["best_threshold"], _f(r["best_mask_iou"])]
            for name, r in metrics["classes"].items()]
    print(tabulate(rows, headers=["class", "IoU", "Dice", "precision", "recall", "boundary F", "pixels", "images",
                                  "mask IoU", "best t", "IoU at best t"], tablefmt="simple"))
    timing = metrics["timing"]
    spread = metrics["boundary_tolerance"]["pixels"]
    tolerance = "-" if spread is None else f"{spread['median']:g}"
    print(f"\n{metrics['images']} images, {_f(timing['images_per_s'])} images/s ({metrics['predictor']})")
    print(f"mIoU {_f(metrics['miou'])} (with background {_f(metrics['miou_with_background'])}), "
          f"mDice {_f(metrics['mdice'])}, boundary F {_f(metrics['mean_boundary_f'])} "
          f"(within {tolerance} px), pixel accuracy {_f(metrics['pixel_accuracy'])}, "
          f"frequency-weighted IoU {_f(metrics['fw_iou'])}, threshold {metrics['threshold']}")
    if metrics["not_averaged"]:
        print(f"no ground truth in the evaluated images, not in the means: {', '.join(metrics['not_averaged'])}")
    if metrics["skipped_labels"]:
        print(f"not in the dataset, not evaluated (they still compete in the label map): "
              f"{', '.join(metrics['skipped_labels'])}")
    print(f"report: {out / 'index.html'}")


def add_command(sub: Any) -> None:
    p = sub.add_parser("eval", help="measure mask quality on a labelled dataset (report with plots)",
                       description="Per class IoU, precision, recall; mIoU, pixel accuracy, fwIoU; a threshold "
                                   "sweep per class; the dataset's statistics; an HTML report.")
    p.add_argument("dataset", help="a folder (images/, masks/, labels.json) or parquet file(s) (image, mask)")
    p.add_argument("--preset", help="a built-in preset (human_parsing, clothing) or a JSON file of labels")
    p.add_argument("--prompt", action="append", help="a text label (repeatable); its name must be in labels.json")
    p.add_argument("--out", default="report", help="the report folder (default report/)")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--model", help="hub id, folder, or a `clipmask finetune` model folder (its decoder on its base, "
                                   "its labels unless --preset/--prompt; default: CLIPMASK_MODEL, else "
                                   "CIDAS/clipseg-rd64-refined); with --api, a model id the deployment serves "
                                   "(clipmask models list)")
    p.add_argument("--calibrate", metavar="OUT.json",
                   help="write each label's best threshold of the sweep ({labels: [{name, prompts, threshold}]})")
    p.add_argument("--device", help="auto, cpu or cuda (default: CLIPMASK_DEVICE, else auto)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="on CUDA (default: CLIPMASK_DTYPE, else bf16)")
    p.add_argument("--cpu-dtype", choices=["auto", "bf16", "fp32"],
                   help="on the CPU (default: CLIPMASK_CPU_DTYPE, else auto: bf16 where the CPU has it natively, "
                        "as the worker picks); the dtype that ran is printed and kept in metrics.json")
    p.add_argument("--batch", type=int, default=8, help="images per engine batch (or jobs in flight with --api)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--api", help="evaluate a running deployment at this URL instead of the engine in process")
    p.add_argument("--api-key", help="with --api (default: CLIPMASK_API_KEY)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--refine", choices=["none", "guided", "matting"], default="none",
                   help="edges as a job's refine makes them (compare boundary F across runs)")
    p.set_defaults(func=lambda args, settings: run(args))
