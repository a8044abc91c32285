"""JPEGs decoded on the model's device, a batch at a time (issue 22, item 4).

On a GPU host the worker's biggest CPU cost per job is the JPEG decode (6-9 CPU ms for a
1024x1536 catalog photo, bench/README.md). When the job needs no host pixels (masks, soft maps,
RLE, label maps; no cutout, overlay, refine or mask embeddings), the runner reads only the JPEG's
header (a fraction of a millisecond: the caps, the size, the EXIF orientation) and hands the
bytes to the engine as an `EncodedJpeg`; the inference thread decodes every JPEG of its batch in
one call on the device (nvJPEG through `torchvision.io.decode_jpeg(list, device="cuda")`), turns
them upright, and resizes and normalises them there like any other image.

Failures: `decode_jpeg` returns nothing for a list with one bad JPEG, so a failed batch is decoded
again one image at a time, and an image the device decoder refuses is decoded on the host by
Pillow (`shared.images.decode`, at the reduced DCT scale), whose errors (image_invalid) fail that
job alone, as they would have without this path.

`HostJpegDecoder` does the same with Pillow: the fallback, and the decoder `device_decode="on"`
gets where there is no nvJPEG (a CPU machine), so that tests and benchmarks run this path there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shared.images import JpegHeader, decode

log = logging.getLogger(__name__)

# JPEGs the batch decoders of this process handled, by where they were decoded: "device" (nvJPEG),
# or "host" (Pillow: one nvJPEG refused, or every one where device decoding is forced on without
# nvJPEG); the worker's metrics read these at scrape time
DECODED = {"device": 0, "host": 0}


@dataclass(frozen=True, eq=False)
class EncodedJpeg:
    """A job's JPEG, not decoded yet: its bytes and header (shared.images.jpeg_header), and the
    smallest size the model needs (a fallback decode on the host may reduce the DCT scale to it)."""

    data: bytes
    header: JpegHeader
    at_least: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the upright picture."""
        return self.header.size


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as PIL's ImageOps.exif_transpose turns it for an EXIF orientation 1-8."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (clockwise by 90)
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90 (counter-clockwise)
        return torch.rot90(image, 1, (-2, -1))
    return image


class JpegDecoder(Protocol):
    name: str

    def decode(self, items: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor]:
        """Each JPEG as an upright (3, H, W) uint8 tensor on `device`; ImageInvalid for a broken one."""
        ...


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.array(array, dtype=np.uint8, copy=not array.flags.writeable)).permute(2, 0, 1)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class HostJpegDecoder:
    """Pillow on the host, at the reduced DCT scale (the runner's own decode), then to the device."""

    name = "pillow"

    def decode_one(self, item: EncodedJpeg, device: torch.device) -> torch.Tensor:
        # the caps were checked on the header; this decode applies the orientation itself
        decoded = decode(item.data, max_pixels=item.header.stored[0] * item.header.stored[1], at_least=item.at_least)
        return _to_device(np.asarray(decoded.image), device)

    def decode(self, items: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor]:
        out = [self.decode_one(item, device) for item in items]
        DECODED["host"] += len(out)
        return out


class NvjpegDecoder:
    """nvJPEG through torchvision, the whole batch in one call; what it refuses goes to Pillow."""

    name = "nvjpeg"

    def __init__(self) -> None:
        # the GPU image's (docker/worker.Dockerfile's TORCHVISION_SPEC); not a set package
        from torchvision.io import ImageReadMode, decode_jpeg  # type: ignore[import-not-found,unused-ignore]

        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.host = HostJpegDecoder()
        self.fallbacks = 0  # images the device refused, decoded by Pillow instead

    def _device_decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = self._decode_jpeg(data, mode=self._rgb, device=device)
        return list(out) if isinstance(out, list | tuple) else [out]

    def decode(self, items: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor]:
        data = [torch.frombuffer(bytearray(item.data), dtype=torch.uint8) for item in items]
        try:
            images: list[torch.Tensor | None] = list(self._device_decode(data, device))
        except Exception as exc:  # noqa: BLE001 - one bad JPEG fails the list: retry them one by one
            log.info("batched device decode of %d JPEGs failed (%s); decoding them one by one", len(items), exc)
            images = []
            for one in data:
                try:
                    images.append(self._device_decode([one], device)[0])
                except Exception:  # noqa: BLE001 - Pillow decides below, with the job's error code
                    images.append(None)
        out = []
        for item, image in zip(items, images, strict=True):
            if image is None:
                self.fallbacks += 1
                DECODED["host"] += 1
                out.append(self.host.decode_one(item, device))  # raises ImageInvalid for broken data
            else:
                DECODED["device"] += 1
                out.append(orient(image, item.header.orientation))
        return out


def _probe_jpeg() -> bytes:
    """A small JPEG (two colours, 4:2:0) to try the device decoder on before trusting it."""
    import io

    from PIL import Image

    picture = Image.new("RGB", (32, 16), (200, 30, 30))
    picture.paste((30, 30, 200), (16, 0, 32, 16))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=95)
    return out.getvalue()


def decodes_on(decode_jpeg: Callable[..., object], device: torch.device) -> bool:
    """Whether `decode_jpeg` (torchvision's) decodes the probe JPEG on `device` to the right picture:
    a torchvision without nvJPEG, or a driver that refuses it, fails here once, at start, instead of
    in every batch (each then decoded again on the host, image by image, in the inference thread)."""
    try:
        out = decode_jpeg([torch.frombuffer(bytearray(_probe_jpeg()), dtype=torch.uint8)], mode="RGB", device=device)
        image = out[0] if isinstance(out, list | tuple) else out
        assert isinstance(image, torch.Tensor)
        left, right = image[:, 8, 4].tolist(), image[:, 8, 28].tolist()
        return (tuple(image.shape) == (3, 16, 32) and image.device.type == device.type
                and left[0] > 150 > left[2] and right[2] > 150 > right[0])
    except Exception as exc:  # noqa: BLE001 - any failure means: decode on the host
        log.warning("the device's JPEG decoder failed its probe (%s: %s); JPEGs are decoded on the host",
                    type(exc).__name__, exc)
        return False


def nvjpeg_available(device: torch.device) -> bool:
    """CUDA, torchvision importable, and its decode_jpeg passing the probe on this device."""
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # noqa: BLE001 - not installed, or built without its image extension
        return False
    return decodes_on(decode_jpeg, device)


def jpeg_decoder_for(setting: str, device: torch.device) -> JpegDecoder | None:
    """The batch decoder for CLIPMASK_DEVICE_DECODE: "auto" nvJPEG when the device is CUDA and
    torchvision has it, else none (the job threads decode with Pillow, as before); "on" nvJPEG
    where it can, else Pillow in the inference thread (for tests and benchmarks of this path on a
    CPU machine, where it is slower than decoding in the job threads); "off" none."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"device_decode must be auto, on or off, not {setting!r}")
    if setting == "off":
        return None
    if nvjpeg_available(device):
        return NvjpegDecoder()
    return HostJpegDecoder() if setting == "on" else None
