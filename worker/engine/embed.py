"""CLIP image embeddings and visual prompts, shared by the fast and the stock engines.

An embedding is the checkpoint's CLIP image feature (vision tower to its end, post layer norm on
the class token, visual projection), L2-normalised, so that cosine similarity is a dot product and
text features of the same CLIP land in the same space. A label's crop for `embed: masks` is the
image cut to the mask's box with every pixel outside the mask set to the processor's mean colour,
which normalises to zero ("neutral grey").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class VisualPrompt:
    """An example image used as a label's condition (CLIPSeg's visual prompt). Equal and hashed by
    content, so the label-embedding cache keeps one entry per distinct example."""

    digest: str
    pixels: np.ndarray = field(compare=False, hash=False, repr=False)  # (H, W, 3) uint8 RGB

    @classmethod
    def of(cls, image: Image.Image | np.ndarray, *, size: tuple[int, int] | None = None) -> VisualPrompt:
        """From a decoded example; with `size` (the model's input, width x height) resized there as
        the processor resizes it (PIL, bilinear), so it holds 352 x 352 pixels, not up to 50 MP."""
        if size is not None:
            picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            picture = picture.convert("RGB")
            image = picture if picture.size == size else picture.resize(size, Image.Resampling.BILINEAR)
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                                              dtype=np.uint8))
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError("a visual prompt must be RGB (H, W, 3)")
        digest = hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()
        return cls(digest, arr)


def features(output: Any) -> torch.Tensor:
    """`get_image_features`/`get_text_features` give a tensor (transformers 4) or an output whose
    pooler_output holds it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def unit(vectors: torch.Tensor) -> np.ndarray:
    """(N, D) -> L2-normalised float32 numpy rows."""
    return F.normalize(vectors.float(), dim=-1).cpu().numpy().astype(np.float32)


def neutral_grey(mean: tuple[float, float, float] | list[float]) -> np.ndarray:
    return np.array([round(m * 255) for m in mean], dtype=np.uint8)


def masked_crop(image: np.ndarray, mask: np.ndarray, bbox: list[int] | None, grey: np.ndarray) -> np.ndarray | None:
    """The image cut to the mask's box, pixels outside the mask grey. `mask` and `bbox` are at the
    output size, which may be larger than `image` (a JPEG decoded at reduced scale): the box is
    scaled and the mask's piece resized (nearest) to match."""
    if bbox is None:
        return None
    height, width = image.shape[:2]
    mask_h, mask_w = mask.shape
    x0, y0, x1, y1 = bbox
    piece = mask[y0:y1, x0:x1]
    if (mask_h, mask_w) != (height, width):
        sx, sy = width / mask_w, height / mask_h
        x0, x1 = math.floor(x0 * sx), max(math.floor(x0 * sx) + 1, math.ceil(x1 * sx))
        y0, y1 = math.floor(y0 * sy), max(math.floor(y0 * sy) + 1, math.ceil(y1 * sy))
        x1, y1 = min(x1, width), min(y1, height)
        piece = np.asarray(Image.fromarray(piece).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST))
    crop = image[y0:y1, x0:x1].copy()
    crop[piece == 0] = grey
    return crop


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """Prompt ensembling as CLIP's zero-shot classifiers do it: the mean of the unit-length
    phrasing embeddings, renormalised, then given the phrasings' mean length, since CLIPSeg's
    decoder is conditioned on unnormalised embeddings (FiLM)."""
    if embeddings.shape[0] == 1:
        return embeddings[0]
    norms = embeddings.norm(dim=-1, keepdim=True)
    direction = (embeddings / norms).mean(dim=0)
    return direction / direction.norm() * norms.mean()
