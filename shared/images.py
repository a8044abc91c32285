"""Image sniffing (cheap, header only) and decoding (EXIF orientation, RGB, pixel cap)."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageInvalid, ImageTooLarge

MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
         (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"), (b"BM", "image/bmp"))


def sniff(data: bytes) -> str | None:
    """The image's MIME type from its header (no full decode), or None if Pillow can't read it.

    An image whose header declares more pixels than Pillow will open is still an image: it is
    accepted here and its job fails `image_too_large`, as the contract says.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return Image.MIME.get(img.format or "", f"image/{(img.format or 'unknown').lower()}")
    except Image.DecompressionBombError:
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "image/webp"
        return next((mime for magic, mime in MAGIC if data.startswith(magic)), "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img.convert("F") if img.mode == "F" else img.convert("I"), dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# EXIF orientations that turn the picture by 90 degrees (width and height swap)
TRANSPOSING = frozenset({5, 6, 7, 8})


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """The caps every decode applies on the header, before a pixel is decoded."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image has {width}x{height} = {width * height} pixels, more than {max_pixels}")
    if width < 1 or height < 1:
        raise ImageInvalid("the image has no pixels")


class JpegHeader:
    """What a JPEG's header says, read without decoding a pixel: its stored size, its EXIF
    orientation (1-8), and the size of the upright picture (`size`, width and height swapped by a
    transposing orientation)."""

    def __init__(self, stored: tuple[int, int], orientation: int) -> None:
        self.stored, self.orientation = stored, orientation
        self.size = (stored[1], stored[0]) if orientation in TRANSPOSING else stored


def jpeg_header(data: bytes, *, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that a decoder on the model's device can take as it is: baseline or
    progressive, 3-channel (YCbCr) or greyscale, one frame. None for anything else (PNG, CMYK,
    MPO, an unreadable header...), which the caller decodes on the host with `decode`, whose
    errors it then gets. The same caps as `decode`: ImageTooLarge past `max_pixels`."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except Image.DecompressionBombError:
        return None  # decode() says image_too_large, with its own message
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        return None
    _check_size(width, height, max_pixels)
    return JpegHeader((width, height), orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1)


class Decoded:
    """A decoded image and the size of the full-resolution picture it stands for (after EXIF)."""

    def __init__(self, image: Image.Image, size: tuple[int, int]) -> None:
        self.image, self.size = image, size

    @property
    def reduced(self) -> bool:
        return self.image.size != self.size


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode to an RGB image upright per EXIF; first frame of animations; transparency on white.

    Raises ImageInvalid for empty, truncated or unknown data and ImageTooLarge past `max_pixels`
    (checked on the header, before any pixel is decoded).
    """
    return decode(data, max_pixels=max_pixels).image


def decode(data: bytes, *, max_pixels: int, at_least: tuple[int, int] | None = None) -> Decoded:
    """decode_image, and with `at_least` (width, height) a JPEG may be decoded at a reduced DCT
    scale (1/2, 1/4, 1/8: Pillow's draft mode), never below that size: what the model needs when no
    output needs the full-resolution pixels. `Decoded.size` is always the full picture's size.
    """
    if not data:
        raise ImageInvalid("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_size(width, height, max_pixels)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            orientation = img.getexif().get(0x0112, 1)
            full = (height, width) if orientation in TRANSPOSING else (width, height)
            if at_least is not None and img.format == "JPEG":
                want = (at_least[1], at_least[0]) if orientation in TRANSPOSING else at_least
                img.draft(img.mode, want)  # the smallest DCT scale still at least `want`; same mode
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img) or img)
            rgb.load()
            return Decoded(rgb, full)
    except (ImageTooLarge, ImageInvalid):
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past our cap when it is raised
        raise ImageTooLarge(f"the image is too large to decode: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageInvalid(f"the data is not a readable image: {exc}") from exc

