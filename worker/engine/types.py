"""What the engine's stages hand each other: a label's mask and maps (`PromptMask`), a request's
result (`SegmentResult`) and what to bring back from the device (`Wanted`). Their own module, so
that postprocess.py (which makes them) and refine.py (which mattes a PromptMask in place) import
neither each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PromptMask:
    prompt: str
    mask: np.ndarray  # (H, W) uint8, 0 or 255
    score: float  # highest probability anywhere in the image
    bbox: list[int] | None  # [x0, y0, x1, y1], exclusive end
    area_fraction: float
    soft: np.ndarray | None = None  # (H, W) uint8 round(255 * p), when asked for
    refine: str = "none"  # what made p: none (bilinear), guided; matting when its soft map is a matte


@dataclass
class SegmentResult:
    masks: list[PromptMask]
    logits: torch.Tensor  # (P, h, w) float32 on CPU at the model's output resolution
    label_map: np.ndarray | None = None  # (H, W) uint8: 0 none, else 1 + index of the most probable label
    # L2-normalised CLIP image embeddings (float32), when asked for: the whole image, and per label
    # its masked crop (None for an empty mask)
    image_embedding: np.ndarray | None = None
    mask_embeddings: list[np.ndarray | None] | None = None


@dataclass(frozen=True)
class Wanted:
    """What to bring back from the device besides the binary masks."""

    soft: bool = False
    label_map: bool = False
