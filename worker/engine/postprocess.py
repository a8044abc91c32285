"""Low-resolution logits -> per-prompt masks at the image's size, on the model's device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Upsample at most this many output pixels at once (prompts x H x W), to bound device memory
# on 50-megapixel images: 64M float32 values = 256 MiB.
MAX_UPSAMPLE_ELEMENTS = 64 * 1024 * 1024


@dataclass
class PromptMask:
    prompt: str
    mask: np.ndarray  # (H, W) uint8, 0 or 255
    score: float  # highest probability anywhere in the image
    bbox: list[int] | None  # [x0, y0, x1, y1], exclusive end
    area_fraction: float


@dataclass
class SegmentResult:
    masks: list[PromptMask]
    logits: torch.Tensor  # (P, h, w) float32 on CPU at the model's output resolution


def _bboxes(mask: torch.Tensor) -> list[list[int] | None]:
    """Tight boxes of (P, H, W) bool masks, computed on the device."""
    rows = mask.any(dim=2)  # (P, H)
    cols = mask.any(dim=1)  # (P, W)
    height, width = mask.shape[1], mask.shape[2]
    r_idx = torch.arange(height, device=mask.device)
    c_idx = torch.arange(width, device=mask.device)
    y0 = torch.where(rows, r_idx, height).amin(dim=1)
    y1 = torch.where(rows, r_idx, -1).amax(dim=1) + 1
    x0 = torch.where(cols, c_idx, width).amin(dim=1)
    x1 = torch.where(cols, c_idx, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).tolist()
    nonempty = rows.any(dim=1).tolist()
    return [box if ok else None for box, ok in zip(boxes, nonempty, strict=True)]


def logits_to_masks(
    logits: torch.Tensor, *, prompts: list[str], height: int, width: int, threshold: float
) -> list[PromptMask]:
    """Bilinear upsampling of (P, h, w) logits to (H, W), sigmoid, threshold; stats on the device."""
    out: list[PromptMask] = []
    step = max(1, MAX_UPSAMPLE_ELEMENTS // (height * width))
    logits = logits.float()
    for start in range(0, logits.shape[0], step):
        chunk = logits[start : start + step].unsqueeze(1)
        up = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
        prob = torch.sigmoid(up)
        scores = prob.amax(dim=(1, 2)).tolist()
        mask = prob >= threshold
        del up, prob
        areas = (mask.sum(dim=(1, 2)).double() / (height * width)).tolist()
        boxes = _bboxes(mask)
        pixels = (mask.to(torch.uint8) * 255).cpu().numpy()
        for i in range(mask.shape[0]):
            out.append(PromptMask(prompts[start + i], pixels[i], float(scores[i]), boxes[i], float(areas[i])))
    return out
