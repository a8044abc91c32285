"""`clipmask sample-data DIR`: a synthetic labelled set to try `eval` and `finetune` on before you
have your own: people-shaped layouts of garments as coloured, textured regions (hat, upper clothes,
pants, a left and a right shoe) on a textured background, jittered in place and size, written in the
folder layout `clipmask eval` reads (images/, masks/, labels.json). A small model can learn it; the
fine-tuning tests and `bench/finetune.py` use it too.

Shoes follow the human-parsing convention: `left_shoe` is the person's left, on the image's right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ["hat", "upper_clothes", "pants", "left_shoe", "right_shoe"]
LABELS = {"0": "background", **{str(i + 1): name for i, name in enumerate(CLASSES)}}
# a hue family per garment, varied per image
BASE_COLOURS = {1: (200, 40, 40), 2: (40, 160, 60), 3: (40, 60, 190), 4: (230, 200, 30), 5: (230, 200, 30)}


def person(seed: int, width: int = 96, height: int = 128) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), dtype=np.uint8)
    cx = width // 2 + int(rng.integers(-10, 11))
    scale = rng.uniform(0.8, 1.1)

    def box(value: int, x0: float, y0: float, x1: float, y1: float) -> None:
        xa, xb = int(cx + x0 * scale * width), int(cx + x1 * scale * width)
        ya, yb = int(y0 * height), int(y1 * height)
        truth[max(0, ya):max(0, yb), max(0, xa):max(0, xb)] = value

    top = rng.uniform(0.02, 0.08)
    box(1, -0.12, top, 0.12, top + 0.12)  # hat
    box(2, -0.22, top + 0.18, 0.22, top + 0.5)  # upper clothes
    box(3, -0.18, top + 0.5, 0.18, top + 0.82)  # pants
    box(5, -0.2, top + 0.84, -0.03, top + 0.92)  # right shoe (image left)
    box(4, 0.03, top + 0.84, 0.2, top + 0.92)  # left shoe (image right)
    pixels = rng.integers(90, 140, (height, width, 3)).astype(np.float32)  # textured background
    for value, colour in BASE_COLOURS.items():
        tint = np.array(colour, dtype=np.float32) + rng.uniform(-25, 25, 3)
        region = truth == value
        pixels[region] = tint + rng.normal(0, 12, (int(region.sum()), 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), truth


def write_folder(root: Path, count: int, *, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(count):
        image, truth = person(seed * 100_000 + i)
        image.save(root / "images" / f"p{i:04d}.png")
        Image.fromarray(truth, mode="L").save(root / "masks" / f"p{i:04d}.png")
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


def run(args: argparse.Namespace) -> int:
    root = write_folder(Path(args.directory), args.count, seed=args.seed)
    print(json.dumps({"dataset": str(root), "images": args.count, "labels": CLASSES}))
    return 0


def add_command(sub: Any) -> None:
    parser = sub.add_parser("sample-data", help="write a small synthetic labelled set (people in garments: "
                            "hat, upper_clothes, pants, left_shoe, right_shoe) for eval and finetune")
    parser.add_argument("directory")
    parser.add_argument("--count", type=int, default=40, help="images (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=lambda args, settings: run(args))
