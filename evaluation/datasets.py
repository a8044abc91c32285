"""Labelled datasets for `clipmask eval`, read lazily (one batch of samples in memory at a time).

Two layouts:
- a folder with `images/` (jpg, jpeg, png, webp), `masks/` (a PNG label map per image, same stem,
  8-bit grayscale or palette: the pixel value is the label) and `labels.json` mapping pixel values
  to label names (`{"0": "background", "1": "hat", ...}`);
- the Hugging Face layout of a dataset like human_parsing_dataset: one or more parquet files
  (a file, or a folder searched recursively) with an `image` and a `mask` column, each holding
  the encoded file (the `datasets` Image feature's `{"bytes", "path"}` struct, or plain bytes).
  Labels come from a `labels.json` beside the files, else the ATR / human_parsing_dataset order
  (0 background, then the 17 classes of the `human_parsing` preset).
Pixel value 255 is "ignore" unless labels.json names it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from shared.presets import BUILTIN

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IGNORE = 255
ATR_LABELS: dict[int, str] = {0: "background", **{i + 1: label["name"]
                                                  for i, label in enumerate(BUILTIN["human_parsing"])}}


class DatasetError(Exception):
    """The dataset can't be read as given; the message says which file and why."""


@dataclass
class Sample:
    name: str
    image: Image.Image  # RGB
    truth: np.ndarray  # (H, W) uint8 label values as stored


class Dataset(Protocol):
    labels: dict[int, str]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sample]: ...


def _read_labels(path: Path) -> dict[int, str]:
    try:
        raw = json.loads(path.read_text())
        labels = {int(value): str(name) for value, name in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path}: expected a JSON object mapping pixel values to label names ({exc})") from exc
    if not labels or any(not 0 <= v <= 255 for v in labels):
        raise DatasetError(f"{path}: pixel values must be 0 to 255")
    return labels


def _truth(data: Image.Image, where: str, size: tuple[int, int]) -> np.ndarray:
    if data.mode not in ("L", "P"):
        raise DatasetError(f"{where}: a label map must be 8-bit grayscale or palette PNG, not mode {data.mode}")
    if data.size != size:
        raise DatasetError(f"{where}: mask is {data.size[0]}x{data.size[1]}, its image {size[0]}x{size[1]}")
    return np.asarray(data, dtype=np.uint8)


def _open_image(data: bytes | Path, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{where}: not a readable image ({exc})") from exc


def _open_mask(data: bytes | Path, where: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return _truth(img, where, size)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{where}: not a readable mask ({exc})") from exc


class FolderDataset:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.labels = _read_labels(root / "labels.json")
        self.images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DatasetError(f"{root / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p.name for p in self.images if not (root / "masks" / f"{p.stem}.png").is_file()]
        if missing:
            raise DatasetError(f"{root / 'masks'}: no mask for {len(missing)} images, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Sample]:
        for path in self.images:
            image = _open_image(path, str(path))
            mask_path = self.root / "masks" / f"{path.stem}.png"
            yield Sample(path.stem, image, _open_mask(mask_path, str(mask_path), image.size))


def _payload(cell: Any) -> tuple[bytes | None, str | None]:
    """An encoded file from a parquet cell: {"bytes", "path"} (datasets' Image feature) or bytes."""
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return bytes(cell), None
    return None, None


class ParquetDataset:
    def __init__(self, path: Path, image_column: str = "image", mask_column: str = "mask") -> None:
        import pyarrow.parquet as pq

        self.files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not self.files:
            raise DatasetError(f"{path}: no parquet files")
        base = path if path.is_dir() else path.parent
        beside = [p for p in (base / "labels.json", base.parent / "labels.json") if p.is_file()]
        self.labels = _read_labels(beside[0]) if beside else dict(ATR_LABELS)
        self.columns = [image_column, mask_column]
        self._rows = 0
        for file in self.files:
            meta = pq.ParquetFile(file)
            names = set(meta.schema_arrow.names)
            if not set(self.columns) <= names:
                raise DatasetError(f"{file}: needs columns {self.columns}, has {sorted(names)}")
            self._rows += meta.metadata.num_rows

    def __len__(self) -> int:
        return self._rows

    def __iter__(self) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        index = 0
        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=16, columns=self.columns):
                images, masks = (batch.column(name).to_pylist() for name in self.columns)
                for image_cell, mask_cell in zip(images, masks, strict=True):
                    image_bytes, image_path = _payload(image_cell)
                    mask_bytes, _ = _payload(mask_cell)
                    where = f"{file.name} row {index}"
                    if image_bytes is None or mask_bytes is None:
                        raise DatasetError(f"{where}: image or mask holds no encoded bytes")
                    name = Path(image_path).stem if image_path else f"row{index:06d}"
                    image = _open_image(image_bytes, where)
                    yield Sample(name, image, _open_mask(mask_bytes, where, image.size))
                    index += 1


def open_dataset(path: str | Path) -> Dataset:
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if root.is_dir() and (root / "images").is_dir():
        if not (root / "labels.json").is_file():
            raise DatasetError(f"{root}: a folder dataset needs labels.json beside images/ and masks/")
        return FolderDataset(root)
    if root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet"))):
        return ParquetDataset(root)
    raise DatasetError(f"{root}: neither a folder with images/, masks/ and labels.json nor parquet files")
