"""Encoding what a job asked for, from the engine's masks, soft maps and label map, under the
job's deterministic keys (`encode_outputs`), and uploading them together (`upload_all`).

The formats are the HTTP contract's ("What to segment and what to return"; README.md walks through them):
- mask: 8-bit grayscale PNG, 0 or 255, image size;
- soft: 8-bit grayscale PNG of round(255 * p), image size;
- rle: COCO run-length encoding of the binary mask, as pycocotools.mask.encode gives it;
- cutout: RGBA PNG of the image cropped to the mask's box, alpha = round(255 * p) (None if empty);
- label_map: palette ("P") PNG, 0 where no label reaches the threshold, else 1 + the label's index;
  the palette colours each label, so the file is also a picture;
- overlay: JPEG of the image with each label's pixels tinted in its palette colour;
- instances: per label, the 8-connected components of its mask (at least a share of the image),
  each with its tight box, mean probability as score, area and COCO RLE, best first.
"""

from __future__ import annotations

import colorsys
import io
import math
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from shared.storage import ObjectStorage, mask_key, output_key
from shared.tables import Job
from worker.engine.jpeg import EncodedJpeg
from worker.engine.types import SegmentResult

OUTPUT_KINDS = ("mask", "soft", "rle", "cutout", "label_map", "overlay", "instances")
OVERLAY_ALPHA = 0.5
OVERLAY_QUALITY = 85


def _deflaters() -> dict[str, Callable[[Any, int], bytes]]:
    out: dict[str, Callable[[Any, int], bytes]] = {"zlib": lambda data, level: zlib.compress(data, level)}
    try:
        from isal import isal_zlib  # ISA-L's igzip; levels 0 to 3

        out["isal"] = lambda data, level: isal_zlib.compress(data, min(level, 3))
    except ImportError:  # (a worker installed without it still writes the same PNGs, slower)
        pass
    return out


# The PNG writer's deflate: ISA-L where installed, faster than zlib and smaller on masks shaped like
# a trained model's (bench/README.md, `python bench/deflate.py`, has the figures and zlib-ng's).
# Any of them is a zlib stream every PNG reader takes.
DEFLATERS = _deflaters()
DEFLATE = "isal" if "isal" in DEFLATERS else "zlib"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grayscale, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, *, sub_filter: bool = False, level: int = 1, deflate: str | None = None) -> bytes:
    """An 8-bit PNG of an (H, W) or (H, W, C) uint8 array, written directly: one filter for every
    row, then zlib at `level`. Pillow's encoder tries filters per row; for our images one fixed
    choice is as small and 2 to 3 times faster (bench/README.md): no filter for binary masks (long
    runs), Sub for soft maps and photos (smooth along rows). `deflate`: "isal" or "zlib"
    (None: the module's DEFLATE, isal where installed); both release the GIL while they work."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError("encode_png takes (H, W) or (H, W, C) uint8 arrays")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in COLOR_TYPES:
        raise ValueError("encode_png writes grayscale, RGB or RGBA")
    raw = scanlines(pixels, sub_filter=sub_filter)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", DEFLATERS[deflate or DEFLATE](raw.data, level))
            + _chunk(b"IEND", b""))


def scanlines(pixels: np.ndarray, *, sub_filter: bool) -> np.ndarray:
    """The filtered PNG rows encode_png deflates: each row's filter byte, then its bytes (Sub: each
    byte minus the byte one pixel to its left, modulo 256; else as they are)."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * channels)
    raw = np.empty((height, width * channels + 1), dtype=np.uint8)
    if sub_filter:
        raw[:, 0] = 1
        raw[:, 1 : channels + 1] = rows[:, :channels]
        np.subtract(rows[:, channels:], rows[:, :-channels], out=raw[:, channels + 1 :])
    else:
        raw[:, 0] = 0
        raw[:, 1:] = rows
    return raw


def png_gray(pixels: np.ndarray, *, sub_filter: bool = False) -> bytes:
    """8-bit grayscale PNG (a mask: no filter; a soft map: sub_filter=True)."""
    return encode_png(pixels, sub_filter=sub_filter)


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a (H, W) mask (nonzero = in), exactly pycocotools.mask.encode's, counts as text."""
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


@dataclass(frozen=True)
class InstanceRules:
    """What counts as an instance of a label's mask (settings instances_min_fraction, max_instances)."""

    min_fraction: float = 0.001  # of the image's pixels
    limit: int = 100


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def instances_of(mask: np.ndarray, soft: np.ndarray, rules: InstanceRules = InstanceRules()) -> list[dict[str, Any]]:
    """A label's instances: the 8-connected components of its binary mask covering at least
    `rules.min_fraction` of the image, each scored by its mean probability (soft / 255), best first
    (then larger first), at most `rules.limit`; each with its tight box, its area and its own COCO RLE."""
    from scipy import ndimage

    components, count = ndimage.label(mask > 0, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    flat = components.ravel()
    areas = np.bincount(flat, minlength=count + 1)
    sums = np.bincount(flat, weights=soft.ravel().astype(np.float64), minlength=count + 1)
    minimum = max(1, math.ceil(rules.min_fraction * mask.size))
    kept = [i for i in range(1, count + 1) if areas[i] >= minimum]
    kept.sort(key=lambda i: (-sums[i] / areas[i], -areas[i], i))
    boxes = ndimage.find_objects(components)
    found = []
    for index in kept[: rules.limit]:
        rows, cols = boxes[index - 1]
        found.append({
            "bbox": [int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)],
            "score": round(float(sums[index] / areas[index] / 255.0), 6),
            "area_fraction": round(float(areas[index] / mask.size), 6),
            "rle": coco_rle(components == index),
        })
    return found


def model_instances(found: list[Any], rules: InstanceRules = InstanceRules()) -> list[dict[str, Any]]:
    """The instances a model kept (SAM 3's, best first: worker/engine/types.py Instance), at most
    `rules.limit`, each with its tight box, score, area and own COCO RLE."""
    out = []
    for inst in found[: rules.limit]:
        out.append({"bbox": inst.bbox, "score": round(float(inst.score), 6),
                    "area_fraction": round(float(np.count_nonzero(inst.mask) / inst.mask.size), 6),
                    "rle": coco_rle(inst.mask)})
    return out


def cutout_png(image: np.ndarray, soft: np.ndarray, bbox: list[int] | None) -> bytes | None:
    """RGBA crop of the (H, W, 3) image to bbox with the soft map as alpha; None for an empty mask."""
    if bbox is None:
        return None
    x0, y0, x1, y1 = bbox
    rgba = np.empty((y1 - y0, x1 - x0, 4), dtype=np.uint8)
    rgba[..., :3] = image[y0:y1, x0:x1]
    rgba[..., 3] = soft[y0:y1, x0:x1]
    return encode_png(rgba, sub_filter=True)


def palette(labels: int) -> np.ndarray:
    """(256, 3) uint8: index 0 black, labels 1..n in distinct, saturated hues (golden-angle steps)."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(1, min(labels, 255) + 1):
        hue = ((index - 1) * 0.618033988749895) % 1.0
        value = 0.95 if (index - 1) % 2 == 0 else 0.75
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colours[index] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def label_map_png(label_map: np.ndarray, labels: int) -> bytes:
    image = Image.fromarray(label_map, mode="P")
    image.putpalette(palette(labels).reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def overlay_jpeg(image: np.ndarray, label_map: np.ndarray, labels: int) -> bytes:
    """The image with each labelled pixel blended half-way towards its label's colour."""
    colours = palette(labels)
    out = image.astype(np.float32)
    tinted = label_map > 0
    out[tinted] = out[tinted] * (1 - OVERLAY_ALPHA) + colours[label_map[tinted]].astype(np.float32) * OVERLAY_ALPHA
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=OVERLAY_QUALITY)
    return buf.getvalue()


@dataclass
class Encoded:
    """A job's results rows, output keys and the objects to upload, before any upload."""

    results: list[dict[str, Any]]
    output_keys: dict[str, str]
    uploads: list[tuple[str, bytes, str]]  # (key, bytes, content type)


def encode_outputs(job: Job, labels: list[dict[str, Any]], outputs: list[str], image: Image.Image | EncodedJpeg,
                   result: SegmentResult, instances: InstanceRules = InstanceRules()) -> Encoded:
    """Everything the job asked for, from one model pass, under deterministic keys. `image` is
    decoded (an Image) whenever the outputs need its pixels (cutout, overlay)."""
    pixels = None
    if {"cutout", "overlay"} & set(outputs):
        if isinstance(image, EncodedJpeg):
            raise ValueError("cutouts and overlays need the decoded image")
        pixels = np.asarray(image)
    encoded = Encoded([], {}, [])

    def stage(name: str, data: bytes, content_type: str) -> str:
        key = output_key(tenant_id=job.tenant_id, job_id=job.id, name=name)
        encoded.uploads.append((key, data, content_type))
        return key

    for index, (label, item) in enumerate(zip(labels, result.masks, strict=True)):
        entry: dict[str, Any] = {
            "prompt": item.prompt, "source": label.get("source", "text"), "bbox": item.bbox,
            "area_fraction": round(item.area_fraction, 6), "score": round(item.score, 6), "refine": item.refine,
        }
        if "mask" in outputs:
            key = mask_key(tenant_id=job.tenant_id, job_id=job.id, index=index)
            encoded.uploads.append((key, png_gray(item.mask), "image/png"))
            entry["mask_key"] = key
        if "soft" in outputs and item.soft is not None:
            entry["soft_key"] = stage(f"{index}.soft.png", png_gray(item.soft, sub_filter=True), "image/png")
        if "rle" in outputs:
            entry["rle"] = coco_rle(item.mask)
        if item.presence is not None:  # SAM 3: how sure the model is that the label appears at all
            entry["presence"] = round(item.presence, 6)
        if "instances" in outputs and item.instances is not None:  # the model's own (SAM 3)
            entry["instances"] = model_instances(item.instances, instances)
        elif "instances" in outputs and item.soft is not None:
            entry["instances"] = instances_of(item.mask, item.soft, instances)
        if "cutout" in outputs and pixels is not None and item.soft is not None:
            cut = cutout_png(pixels, item.soft, item.bbox)
            entry["cutout_key"] = None if cut is None else stage(f"{index}.cutout.png", cut, "image/png")
        if result.mask_embeddings is not None:
            vector = result.mask_embeddings[index]
            entry["embedding"] = None if vector is None else vector_list(vector)
        encoded.results.append(entry)
    if result.label_map is not None:
        if "label_map" in outputs:
            encoded.output_keys["label_map"] = stage("label_map.png", label_map_png(result.label_map, len(labels)),
                                                     "image/png")
        if "overlay" in outputs and pixels is not None:
            encoded.output_keys["overlay"] = stage("overlay.jpg", overlay_jpeg(pixels, result.label_map, len(labels)),
                                                   "image/jpeg")
    return encoded


def vector_list(vector: np.ndarray) -> list[float]:
    """An embedding as JSON numbers: float32 precision, which is what it has."""
    return [float(f"{x:.7g}") for x in vector.tolist()]


@cache
def _upload_pool() -> ThreadPoolExecutor:
    """A job's objects go up together (their PUTs wait on the network, not the CPU): one pool per
    process, made on its first job with more than one object (not at import)."""
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="upload")


def upload_all(storage: ObjectStorage, uploads: list[tuple[str, bytes, str]]) -> None:
    """PUT every (key, bytes, content type) at once; the first failure (StorageFailed) is raised
    once all have ended, so no PUT of this job is still running when the caller goes on."""
    if len(uploads) <= 1:
        for key, data, content_type in uploads:
            storage.put(key, data, content_type=content_type)
        return
    futures = [_upload_pool().submit(storage.put, key, data, content_type=kind) for key, data, kind in uploads]
    wait(futures)
    for future in futures:
        future.result()
