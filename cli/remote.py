"""`clipmask submit` and `clipmask batch`: the service from a terminal, through the Python client.

Both read the API address and key from --base-url/--api-key or CLIPMASK_API_URL/CLIPMASK_API_KEY.

Output files have a stable layout under `{out}/{name}/`, where name is the image's file stem
(submit) or the catalog row number, zero-padded (batch): per label `{NN}_{label}.png` (mask),
`{NN}_{label}.soft.png`, `{NN}_{label}.cutout.png`, `{NN}_{label}.rle.json`,
`{NN}_{label}.instances.json` (the label's instances: box, score, area, RLE), and per image
`label_map.png` and `overlay.jpg`, for the outputs the job asked for. `clipmask batch` keeps its state
in `{out}/.clipmask-batch.json`; run it again after an interruption and it resumes the same batch
(never resubmits), skipping masks already on disk. The submit request carries an Idempotency-Key
derived from the catalog, so even a crash between the POST and the state file cannot submit twice
within the API's 24 h idempotency window.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from client import Batch, Clipmask, ClipmaskError, Job
from shared.enums import UNFINISHED_JOB, BatchStatus, JobStatus

STATE = ".clipmask-batch.json"
OUTPUT_CHOICES = ["mask", "soft", "rle", "cutout", "label_map", "overlay", "instances"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-").lower()[:40] or "prompt"


def output_files(out: Path, name: str, job: Job) -> list[tuple[str, Path]]:
    """(presigned URL, file) for every file output of a succeeded job."""
    files: list[tuple[str, Path]] = []
    for i, r in enumerate(job.results):
        stem = out / name / f"{i:02d}_{_slug(r.prompt)}"
        for url, suffix in ((r.mask_url, ".png"), (r.soft_url, ".soft.png"), (r.cutout_url, ".cutout.png")):
            if url:
                files.append((url, stem.with_name(stem.name + suffix)))
    for key, filename in (("label_map_url", "label_map.png"), ("overlay_url", "overlay.jpg")):
        url = (job.outputs or {}).get(key)
        if url:
            files.append((url, out / name / filename))
    return files


def save_outputs(cm: Clipmask, out: Path, name: str, job: Job, *, skip_existing: bool = False) -> list[Path]:
    """Download a job's files and write its RLEs and instances as JSON next to them."""
    saved = []
    for url, path in output_files(out, name, job):
        if not (skip_existing and path.exists()):
            cm.download(url, path)
        saved.append(path)
    for i, r in enumerate(job.results):
        for kind, value in (("rle", r.rle), ("instances", r.instances)):
            if value is not None:
                path = out / name / f"{i:02d}_{_slug(r.prompt)}.{kind}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(value))
                saved.append(path)
    return saved


def _client(args: argparse.Namespace) -> Clipmask:
    key = args.api_key or os.environ.get("CLIPMASK_API_KEY")
    if not key:
        print("give --api-key or set CLIPMASK_API_KEY", file=sys.stderr)
        raise SystemExit(2)
    return Clipmask(args.base_url or os.environ.get("CLIPMASK_API_URL", "http://127.0.0.1:8000"), key)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    """NAME=VALUE arguments as a dict (exit 2 on one without '=')."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            print(f"{what} takes NAME=VALUE, got {value!r}", file=sys.stderr)
            raise SystemExit(2)
        out[name] = rest
    return out


def _boxes(given: list[str]) -> list[dict[str, Any]]:
    """--box LABEL=X0,Y0,X1,Y1 (or =-X0,... for a negative box), grouped by label in first-seen order."""
    prompts: dict[str, dict[str, Any]] = {}
    for value in given:
        label, _, box = value.partition("=")
        negative = box.startswith("-")
        try:
            coords = [float(v) for v in box.removeprefix("-").split(",")]
        except ValueError:
            coords = []
        if not label or len(coords) != 4:
            print(f"--box takes LABEL=X0,Y0,X1,Y1, got {value!r}", file=sys.stderr)
            raise SystemExit(2)
        entry = prompts.setdefault(label, {"label": label, "boxes": [], "negative_boxes": []})
        entry["negative_boxes" if negative else "boxes"].append(coords)
    return list(prompts.values())


def cmd_submit(args: argparse.Namespace, _settings: Any) -> int:
    with _client(args) as cm:
        try:
            examples = _pairs(args.image_prompt, "--image-prompt")
            job = cm.create_job(args.image, args.prompt or None, preset=args.preset, outputs=args.output or None,
                                threshold=args.threshold, wait=60 if (args.wait or args.out) else None,
                                image_prompts=dict(examples) if examples else None, embed=args.embed or None,
                                model=args.model, refine=args.refine, box_prompts=_boxes(args.box) or None)
            print(f"job {job.id} {job.status}", file=sys.stderr)
            if args.wait or args.out:
                job = cm.wait(job.id, timeout=args.timeout)
        except ClipmaskError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.out and job.status == JobStatus.SUCCEEDED:
            name = Path(args.image.split("?")[0]).stem or job.id
            for path in save_outputs(cm, Path(args.out), name, job):
                print(path, file=sys.stderr)
    print(json.dumps(job.raw))
    return 0 if job.status in (*UNFINISHED_JOB, JobStatus.SUCCEEDED) else 1


def cmd_models_push(args: argparse.Namespace, _settings: Any) -> int:
    with _client(args) as cm:
        try:
            created = cm.create_model(args.folder, args.name)
        except ClipmaskError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"error: {args.folder}: {exc} (a folder clipmask finetune wrote)", file=sys.stderr)
            return 2
    after = created["metrics"].get("validation_after", {}).get("miou")
    print(f"model {created['id']} {created['revision']} on {created['base']['id']}; labels: "
          + ", ".join(f"{label['name']} ({label.get('threshold') or 0.4})" for label in created["labels"])
          + ("" if after is None else f"; validation mIoU {after:.3f}"), file=sys.stderr)
    print(json.dumps(created))
    return 0


def cmd_models_list(args: argparse.Namespace, _settings: Any) -> int:
    from tabulate import tabulate

    with _client(args) as cm:
        models = cm.list_models()
    rows = [[m["id"], "base" if m["builtin"] else "fine-tuned", (m["revision"] or "")[:19],
             ", ".join(label["name"] for label in m["labels"])] for m in models]
    print(tabulate(rows, headers=["model", "kind", "revision", "labels"]))
    return 0


def cmd_models_delete(args: argparse.Namespace, _settings: Any) -> int:
    with _client(args) as cm:
        try:
            cm.delete_model(args.name)
        except ClipmaskError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _catalog_items(path: Path) -> int:
    """Rows in the catalog (CSV data rows or non-blank JSONL lines)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return sum(1 for _ in csv.DictReader(text.splitlines()))
    return sum(1 for line in text.splitlines() if line.strip())


def _save(state_path: Path, state: dict[str, Any]) -> None:
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(state_path)


def _row_order(cm: Clipmask, batch_id: str) -> list[str]:
    """Job ids in catalog order (the API lists newest first; items are created in input order)."""
    return [job.id for job in cm.iter_batch_jobs(batch_id)][::-1]


def cmd_batch(args: argparse.Namespace, _settings: Any) -> int:
    catalog = Path(args.catalog)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    options = [args.prompt, args.threshold, args.preset, args.output]
    if args.refine is not None:  # (a digest from before --refine existed still resumes)
        options.append(args.refine)
    digest = hashlib.sha256(catalog.read_bytes() + json.dumps(options).encode()).hexdigest()
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    with _client(args) as cm:
        try:
            if state.get("catalog_sha256") == digest and state.get("batch_id"):
                print(f"resuming batch {state['batch_id']}", file=sys.stderr)
            else:
                total = _catalog_items(catalog)
                batch = cm.create_batch(file=catalog, prompts=args.prompt or None, preset=args.preset,
                                        outputs=args.output or None, threshold=args.threshold,
                                        refine=args.refine, priority=args.priority,
                                        idempotency_key=f"clipmask-cli-{digest[:48]}")
                state = {"catalog_sha256": digest, "batch_id": batch.id, "total": total, "order": None}
                _save(state_path, state)
                print(f"submitted batch {batch.id} ({total} items)", file=sys.stderr)
            if not state.get("order"):
                state["order"] = _row_order(cm, state["batch_id"])
                _save(state_path, state)
            batch = _follow(cm, state, out, args.poll)
        except ClipmaskError as exc:
            print(f"error: {exc} (run the same command again to resume)", file=sys.stderr)
            return 1
    print(json.dumps(batch.raw))
    return 0 if batch.status == BatchStatus.COMPLETED and batch.counts[JobStatus.FAILED] == 0 else 1


def _follow(cm: Clipmask, state: dict[str, Any], out: Path, poll_s: float) -> Batch:
    """Progress bar with counts; masks downloaded as jobs succeed; the manifest saved at the end."""
    index = {job_id: i for i, job_id in enumerate(state["order"])}
    width = max(6, len(str(len(index))))
    done: set[str] = set()

    def fetch(job: Job) -> None:
        if job.id in done or job.status != JobStatus.SUCCEEDED:
            return
        save_outputs(cm, out, f"{index[job.id]:0{width}d}", job, skip_existing=True)
        done.add(job.id)

    bar = tqdm(total=len(index), unit="job", desc="batch", file=sys.stderr)
    cursor: str | None = None
    while True:
        batch = cm.get_batch(state["batch_id"])
        c = batch.counts
        finished = c[JobStatus.SUCCEEDED] + c[JobStatus.FAILED] + c[JobStatus.CANCELED]
        bar.update(finished - bar.n)
        bar.set_postfix(ok=c[JobStatus.SUCCEEDED], failed=c[JobStatus.FAILED], running=c[JobStatus.RUNNING],
                        queued=c[JobStatus.QUEUED],
                        saved=len(done))
        if batch.finished and batch.results_url:
            break
        # A few pages of succeeded jobs per round, resuming where the last round stopped.
        for _ in range(5):
            page = cm.list_batch_jobs(state["batch_id"], status=JobStatus.SUCCEEDED, cursor=cursor)
            for job in page.data:
                fetch(job)
            cursor = page.next_cursor
            if cursor is None:
                break
        time.sleep(poll_s)
    assert batch.results_url is not None  # the loop above waits for it
    manifest = cm.download(batch.results_url, out / "results.jsonl")
    failed = []
    for line in manifest.read_text().splitlines():
        job = Job.from_api(json.loads(line))
        fetch(job)
        if job.status != JobStatus.SUCCEEDED:
            failed.append({"row": index.get(job.id), "id": job.id, "status": job.status, "error": job.error,
                           "image_url": job.input.get("image_url")})
    bar.set_postfix(ok=batch.counts[JobStatus.SUCCEEDED], failed=batch.counts[JobStatus.FAILED], saved=len(done))
    bar.close()
    (out / "failed.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failed))
    print(f"batch {batch.status}: {batch.counts['succeeded']} succeeded, {batch.counts['failed']} failed, "
          f"{batch.counts['canceled']} canceled; masks in {out}/, results in {out}/results.jsonl", file=sys.stderr)
    return batch


def cmd_search(args: argparse.Namespace, _settings: Any) -> int:
    from tabulate import tabulate

    with _client(args) as cm:
        try:
            hits = cm.search(text=args.text, image=args.image, job_id=args.like, result_index=args.result,
                             scope=args.scope, limit=args.limit, batch_id=args.batch,
                             metadata=_pairs(args.meta, "--meta") or None)
        except ClipmaskError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(hits))
        return 0
    rows = [[rank, f"{hit['score']:.4f}", hit["job_id"], "" if hit["result_index"] is None else hit["result_index"],
             hit["prompt"] or "", " ".join(f"{k}={v}" for k, v in sorted(hit["metadata"].items()))]
            for rank, hit in enumerate(hits, 1)]
    print(tabulate(rows, headers=["#", "score", "job", "result", "label", "metadata"]))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--base-url", help="default $CLIPMASK_API_URL or http://127.0.0.1:8000")
        parser.add_argument("--api-key", help="default $CLIPMASK_API_KEY")
        parser.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
        parser.add_argument("--preset", help="clothing, human_parsing or one of your presets (GET /v1/presets)")
        parser.add_argument("--output", action="append", default=[], choices=OUTPUT_CHOICES,
                            help="repeat for several; default mask")
        parser.add_argument("--threshold", type=float)
        parser.add_argument("--refine", choices=["none", "guided", "matting"],
                            help="edges: none (default), guided (follow the photo's edges), matting (soft maps and "
                                 "cutouts from an alpha matte)")

    submit = sub.add_parser("submit", help="segment one image (path, URL or s3:// URI); --wait/--out to get the "
                            "outputs")
    submit.add_argument("image")
    common(submit)
    submit.add_argument("--wait", action="store_true")
    submit.add_argument("--out", help="download the outputs here (implies --wait)")
    submit.add_argument("--timeout", type=float, default=600)
    submit.add_argument("--image-prompt", action="append", default=[], metavar="LABEL=IMAGE",
                        help="segment what looks like IMAGE (path or URL) as LABEL; repeat for up to 4")
    submit.add_argument("--embed", action="append", default=[], choices=["image", "masks"],
                        help="store CLIP embeddings for search: of the image, of each label's crop")
    submit.add_argument("--model", help="a base (a sam3 one too) or one of your fine-tuned models (clipmask models "
                                        "list); without --prompt and --preset, a fine-tuned model's own labels")
    submit.add_argument("--box", action="append", default=[], metavar="LABEL=X0,Y0,X1,Y1",
                        help="sam3 bases: segment what looks like the boxed example as LABEL; repeat a LABEL for more "
                             "boxes, prefix the box with - for a negative one (LABEL=-X0,Y0,X1,Y1)")
    submit.set_defaults(func=cmd_submit)

    find = sub.add_parser("search", help="find your most similar images or label crops (jobs run with --embed)")
    query = find.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help='a description: "red floral dress"')
    query.add_argument("--image", help="an image file or URL")
    query.add_argument("--like", metavar="JOB_ID", help="a stored job's embedding (--result N for a label's)")
    find.add_argument("--result", type=int, help="with --like: that result's crop instead of the whole image")
    find.add_argument("--scope", choices=["images", "masks"], default="images")
    find.add_argument("--limit", type=int, default=10)
    find.add_argument("--batch", help="only this batch's jobs")
    find.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="exact metadata match")
    find.add_argument("--json", action="store_true", help="print the hits as JSON instead of a table")
    find.add_argument("--base-url", help="default $CLIPMASK_API_URL or http://127.0.0.1:8000")
    find.add_argument("--api-key", help="default $CLIPMASK_API_KEY")
    find.set_defaults(func=cmd_search)

    models = sub.add_parser("models", help="your fine-tuned models: push a clipmask finetune folder, list, delete")
    verbs = models.add_subparsers(dest="models_command", required=True)
    push = verbs.add_parser("push", help="upload a folder clipmask finetune wrote")
    push.add_argument("folder")
    push.add_argument("--name", required=True, help="its id: 1 to 64 of a-z, 0-9, '.', '_', '-'")
    push.set_defaults(func=cmd_models_push)
    listing = verbs.add_parser("list", help="the base model(s) and yours")
    listing.set_defaults(func=cmd_models_list)
    drop = verbs.add_parser("delete", help="delete one of yours")
    drop.add_argument("name")
    drop.set_defaults(func=cmd_models_delete)
    for parser in (push, listing, drop):
        parser.add_argument("--base-url", help="default $CLIPMASK_API_URL or http://127.0.0.1:8000")
        parser.add_argument("--api-key", help="default $CLIPMASK_API_KEY")

    batch = sub.add_parser("batch", help="submit a CSV/JSONL catalog, follow it, download masks (resumable)")
    batch.add_argument("catalog")
    batch.add_argument("--out", required=True)
    common(batch)
    batch.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls")
    batch.add_argument("--priority", choices=["low", "normal", "high"],
                       help="the order of your batches in the bulk lane (default normal)")
    batch.set_defaults(func=cmd_batch)
