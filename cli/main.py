"""The `clipmask` console script.

  clipmask tenant create NAME     JSON {tenant_id, api_key, webhook_secret}
  clipmask tenant list|disable ID, key create TENANT|revoke KEY
  clipmask jobs list [--status S], jobs retry ID|--failed
  clipmask retention [--days N]   delete finished jobs older than the retention period
  clipmask dev-model DIR          tiny random-weight CLIPSeg for offline runs (--size full: real shape;
                                  --family sam3: a SAM 3)
  clipmask dev-s3 DIR --port P    SeaweedFS's S3 server, objects kept under DIR (the native stack's storage)
  clipmask dev-s3 DIR --port P --wait S   wait until that server serves every object it kept
  clipmask migrate                alembic upgrade head
  clipmask init-storage           create the bucket if missing
  clipmask model-available [ID]   exit 0 if the hub model can be loaded here
  clipmask demo                   tenant + one job on a generated sample image, waits, prints it
  clipmask submit IMAGE --prompt shirt [--wait] [--out DIR]     one job through the API
  clipmask batch CATALOG.csv --out DIR [--prompt P]             a catalog, with progress, resumable
  clipmask tenant limits ID [--rate-limit R] [--burst N] [--max-queued N]
  clipmask eval DATASET --preset human_parsing --out report/   mask quality, plots, HTML report
  clipmask refine IMAGE MASK --method guided|matting --out OUT.png   sharpen any coarse mask with the photo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.settings import Settings


def cmd_tenant_create(args: argparse.Namespace, settings: Settings) -> int:
    from cli.admin import sessions_for
    from shared.db import session_scope
    from shared.tenants import create_tenant

    with session_scope(sessions_for(settings)) as session:
        new = create_tenant(session, name=args.name)
    print(json.dumps({"tenant_id": new.tenant_id, "api_key": new.api_key, "webhook_secret": new.webhook_secret}))
    return 0


def cmd_dev_model(args: argparse.Namespace, settings: Settings) -> int:
    from worker.engine.devmodel import write_dev_model, write_sam3_dev_model

    write = write_sam3_dev_model if args.family == "sam3" else write_dev_model
    out = write(args.directory, size=args.size)
    print(json.dumps({"model_dir": str(out), "family": args.family, "size": args.size, "random_weights": True}))
    return 0


def cmd_dev_s3(args: argparse.Namespace, settings: Settings) -> int:
    from cli.dev_s3 import Ports, run, wait_ready

    if not (settings.s3_access_key_id and settings.s3_secret_access_key):
        print("set CLIPMASK_S3_ACCESS_KEY_ID and CLIPMASK_S3_SECRET_ACCESS_KEY: the server refuses anonymous "
              "requests", file=sys.stderr)
        return 2
    if args.wait is not None:
        try:
            waited = wait_ready(f"http://127.0.0.1:{args.port}", access_key=settings.s3_access_key_id,
                                secret_key=settings.s3_secret_access_key, timeout=args.wait,
                                data_dir=Path(args.directory).resolve(), ports=Ports.from_s3(args.port))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(json.dumps({"ready_after_s": round(waited, 2)}))
        return 0
    return run(Path(args.directory).resolve(), args.port, access_key=settings.s3_access_key_id,
               secret_key=settings.s3_secret_access_key)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.migrate import upgrade

    upgrade(settings.database_url)
    return 0


def cmd_refine(args: argparse.Namespace, settings: Settings) -> int:
    """A coarse mask or probability map from any model (8-bit grayscale, any size) refined with the
    photo's edges, as a job's `refine` does it; writes an 8-bit grayscale PNG of the photo's size."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from shared.errors import JobFailure
    from shared.images import decode_image
    from worker.engine.refine import refine_map

    try:
        photo = np.asarray(decode_image(Path(args.image).read_bytes(), max_pixels=settings.max_image_pixels))
    except (OSError, JobFailure) as exc:
        print(f"error: {args.image}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        with Image.open(args.mask) as picture:
            if picture.mode not in ("L", "1", "P", "LA"):
                print(f"error: {args.mask}: expected an 8-bit grayscale mask, got mode {picture.mode}",
                      file=sys.stderr)
                return 2
            coarse = np.asarray(picture.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        print(f"error: {args.mask}: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    refined, applied = refine_map(photo, coarse, args.method, device=device,
                                  max_matte_pixels=None if args.method == "guided" else settings.matting_max_pixels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(refined, mode="L").save(args.out, format="PNG")
    print(json.dumps({"out": args.out, "width": refined.shape[1], "height": refined.shape[0], "method": applied,
                      "mask_size": [coarse.shape[1], coarse.shape[0]]}))
    return 0


def cmd_init_storage(args: argparse.Namespace, settings: Settings) -> int:
    """Create the bucket if missing; with --wait, retry until the server answers (a server starting)."""
    import time

    from shared.errors import StorageFailed
    from shared.storage import ObjectStorage

    deadline = time.monotonic() + args.wait
    while True:
        try:
            ObjectStorage(settings).ensure_bucket()
            return 0
        except StorageFailed as exc:
            if time.monotonic() >= deadline:
                print(f"object storage not ready: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.3)


def cmd_model_available(args: argparse.Namespace, settings: Settings) -> int:
    model = args.model or settings.model
    if Path(model).is_dir():
        return 0 if (Path(model) / "config.json").exists() else 1
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model, "config.json", etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means "not loadable here"
        print(f"{model} cannot be loaded here: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from cli.demo import run_demo

    return run_demo(settings, base_url=args.base_url, out_dir=Path(args.out), random_weights=args.random_weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmask", description="clipmask administration and tools")
    sub = parser.add_subparsers(dest="command", required=True)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(dest="tenant_command", required=True)
    create = tenant.add_parser("create", help="create a tenant and print its API key and webhook secret")
    create.add_argument("name")
    create.set_defaults(func=cmd_tenant_create)

    dev = sub.add_parser("dev-model", help="write a random-weight CLIPSeg (or SAM 3) into DIR (no download)")
    dev.add_argument("directory")
    dev.add_argument("--family", choices=["clipseg", "sam3"], default="clipseg")
    dev.add_argument("--size", choices=["tiny", "full"], default="tiny")
    dev.set_defaults(func=cmd_dev_model)

    s3 = sub.add_parser("dev-s3", help="run SeaweedFS's S3 server in the foreground, objects kept under DIR "
                        "(the native stack's storage; keys from CLIPMASK_S3_ACCESS_KEY_ID/SECRET_ACCESS_KEY)")
    s3.add_argument("directory")
    s3.add_argument("--port", type=int, default=9000, help="the S3 port; the next seven ports are SeaweedFS's own")
    s3.add_argument("--wait", type=float, metavar="SECONDS",
                    help="do not serve: wait until the server already started on DIR and PORT answers and "
                    "its master knows every volume on disk (after a restart, old objects read back)")
    s3.set_defaults(func=cmd_dev_s3)

    from cli.admin import add_commands
    from cli.remote import add_commands as add_client_commands
    from evaluation.finetune import add_command as add_finetune_command
    from evaluation.run import add_command as add_eval_command
    from evaluation.sample_data import add_command as add_sample_data_command

    add_commands(sub, tenant)
    add_client_commands(sub)
    add_eval_command(sub)
    add_finetune_command(sub)
    add_sample_data_command(sub)

    refine = sub.add_parser("refine", help="refine a coarse mask or probability map (any model's, 8-bit grayscale, "
                            "any size) with the photo's edges; writes round(255 p) at the photo's size")
    refine.add_argument("image")
    refine.add_argument("mask")
    refine.add_argument("--method", choices=["guided", "matting"], default="guided")
    refine.add_argument("--out", required=True, help="the refined map, an 8-bit grayscale PNG")
    refine.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    refine.set_defaults(func=cmd_refine)

    sub.add_parser("migrate", help="alembic upgrade head").set_defaults(func=cmd_migrate)
    init_storage = sub.add_parser("init-storage", help="create the bucket if missing")
    init_storage.add_argument("--wait", type=float, default=0.0, help="seconds to keep trying while the server starts")
    init_storage.set_defaults(func=cmd_init_storage)

    avail = sub.add_parser("model-available", help="exit 0 if the model can be loaded on this machine")
    avail.add_argument("model", nargs="?")
    avail.set_defaults(func=cmd_model_available)

    demo = sub.add_parser("demo", help="segment a generated sample image through the running stack")
    demo.add_argument("--base-url", default="http://127.0.0.1:8000")
    demo.add_argument("--out", default=".run/demo")
    demo.add_argument("--random-weights", action="store_true", help="label the masks as random-weight")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args, Settings()))


if __name__ == "__main__":
    sys.exit(main())
