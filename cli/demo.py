"""`clipmask demo`: one job end to end through the running stack, with only the standard library
as HTTP client, so it works from any install."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from shared.enums import UNFINISHED_JOB, JobStatus
from shared.settings import Settings


def sample_image() -> bytes:
    """A 768x1024 catalog-like picture: a figure with a shirt and trousers on a light background."""
    img = Image.new("RGB", (768, 1024), (236, 236, 232))
    draw = ImageDraw.Draw(img)
    draw.ellipse((324, 80, 444, 210), fill=(224, 182, 150))  # head
    draw.rectangle((264, 220, 504, 560), fill=(40, 90, 170))  # shirt
    draw.rectangle((204, 230, 264, 520), fill=(40, 90, 170))  # sleeves
    draw.rectangle((504, 230, 564, 520), fill=(40, 90, 170))
    draw.rectangle((284, 560, 376, 940), fill=(60, 60, 66))  # trousers
    draw.rectangle((392, 560, 484, 940), fill=(60, 60, 66))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _call(method: str, url: str, *, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def run_demo(settings: Settings, *, base_url: str, out_dir: Path, random_weights: bool) -> int:
    from cli.admin import sessions_for
    from shared.db import session_scope
    from shared.tenants import create_tenant

    with session_scope(sessions_for(settings)) as session:
        tenant = create_tenant(session, name="demo")
    image = sample_image()
    job = _call("POST", f"{base_url}/v1/jobs", key=tenant.api_key, body={
        "image_base64": base64.b64encode(image).decode(), "prompts": ["shirt", "pants"],
        "metadata": {"sku": "DEMO-1"}})
    print(f"submitted job {job['id']}; waiting", end="", flush=True)
    deadline = time.monotonic() + 300
    while job["status"] in UNFINISHED_JOB and time.monotonic() < deadline:
        time.sleep(0.5)
        print(".", end="", flush=True)
        job = _call("GET", f"{base_url}/v1/jobs/{job['id']}", key=tenant.api_key)
    print()
    print(json.dumps(job, indent=2))
    if job["status"] != JobStatus.SUCCEEDED:
        print(f"demo job ended {job['status']}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "input.jpg").write_bytes(image)
    for index, result in enumerate(job["results"]):
        try:
            with urllib.request.urlopen(result["mask_url"], timeout=30) as resp:
                png = resp.read()
        except urllib.error.URLError as exc:
            print(f"could not download mask {index}: {exc}", file=sys.stderr)
            return 1
        mask = Image.open(io.BytesIO(png))
        path = out_dir / f"{index}-{result['prompt']}.png"
        path.write_bytes(png)
        print(f"mask {result['prompt']!r}: {mask.format} {mask.mode} {mask.size[0]}x{mask.size[1]} -> {path}")
        if mask.size != (job["image"]["width"], job["image"]["height"]):
            print("mask size differs from the image size", file=sys.stderr)
            return 1
    if random_weights:
        print("NOTE: these masks come from a random-weight dev model (no hub access here); they are "
              "not meaningful. Set CLIPMASK_MODEL to CIDAS/clipseg-rd64-refined or a local copy of it.")
    print("demo succeeded")
    return 0
