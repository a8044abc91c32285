"""Low-resolution logits -> everything a job returns at the image's size, on the model's device.

One upsampling per label gives the probability map p (bilinear, or refined with the photo as
guide: refine.py); from it come the binary mask (p >= t),
the soft map (round(255 * p)), the label map (1 + the most probable label where it reaches t,
else 0), the score, the box and the area. Only what the job asked for leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine import refine
from worker.engine.types import PromptMask, Wanted

# Upsample at most this many output pixels at once (prompts x H x W), to bound device memory
# on 50-megapixel images: 64M float32 values = 256 MiB.
MAX_UPSAMPLE_ELEMENTS = 64 * 1024 * 1024


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a host array. From CUDA it lands in pinned (page-locked) memory: one DMA at
    the link's full rate, where `.cpu()` copies into pageable memory through a staging buffer. The
    array keeps its pinned block alive, and the caching host allocator reuses it once it is freed."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def _bboxes(mask: torch.Tensor) -> list[list[int] | None]:
    """Tight boxes of (P, H, W) masks (bool or 0/1 uint8), computed on the device. A uint8 max
    over rows and columns is many times faster than `any` over bools."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    rows = mask.amax(dim=2) > 0  # (P, H)
    cols = mask.amax(dim=1) > 0  # (P, W)
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


def upsample(
    logits: torch.Tensor, *, prompts: list[str], height: int, width: int, threshold: float | Sequence[float],
    wanted: Wanted = Wanted(), guide: torch.Tensor | None = None,
) -> tuple[list[PromptMask], np.ndarray | None]:
    """Bilinear upsampling of (P, h, w) logits to (H, W), sigmoid, refined by the guided filter
    with `guide` ((1, 3, H, W) in [0, 1]) if given, then masks (and soft maps, and the label map, if
    wanted) with their stats, in chunks that bound device memory. `threshold` is one
    for every label or one per label; a label map pixel goes to the most probable of the labels
    that reach their threshold there (with one threshold: the most probable, if it reaches it)."""
    if len(prompts) > 254:
        raise ValueError("a label map holds at most 254 labels")
    out: list[PromptMask] = []
    if not prompts:  # an embedding-only job
        empty = np.zeros((height, width), dtype=np.uint8) if wanted.label_map else None
        return out, empty
    held = 1 if guide is None else refine.GUIDED_VALUES_PER_PIXEL
    step = max(1, MAX_UPSAMPLE_ELEMENTS // (height * width * held))
    logits = logits.float()
    single, per_label = 0.0, None
    if isinstance(threshold, int | float):
        single = float(threshold)
    else:
        per_label = torch.tensor([float(t) for t in threshold], device=logits.device)
        if per_label.shape[0] != len(prompts):
            raise ValueError(f"{per_label.shape[0]} thresholds for {len(prompts)} labels")
    best = best_index = None
    if wanted.label_map:
        best = torch.full((height, width), -1.0, device=logits.device)
        best_index = torch.zeros((height, width), dtype=torch.uint8, device=logits.device)
    for start in range(0, logits.shape[0], step):
        chunk = logits[start : start + step].unsqueeze(1)
        up = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
        prob = up.sigmoid_()  # in place: one full-size buffer fewer to allocate and fault in
        del up
        if guide is not None:
            prob = refine.guided(prob, guide)
        scores = prob.amax(dim=(1, 2)).tolist()
        mask = prob >= (single if per_label is None else per_label[start : start + step].view(-1, 1, 1))
        soft = to_host((prob * 255).round_().to(torch.uint8)) if wanted.soft else None
        if best is not None and best_index is not None:
            top, arg = torch.where(mask, prob, -1.0).max(dim=0)  # among the labels reaching their threshold
            better = top > best  # ties keep the earlier label
            best = torch.where(better, top, best)
            best_index = torch.where(better, (arg + start + 1).to(torch.uint8), best_index)
            del top, arg, better
        del prob
        ones = mask.view(torch.uint8)  # 0/1, no copy
        boxes = _bboxes(ones)
        pixels = to_host(ones * 255)
        # counted on the host copy: summing bools on the device first widens them to int64
        areas = [np.count_nonzero(p) / (height * width) for p in pixels]
        for i in range(mask.shape[0]):
            out.append(PromptMask(prompts[start + i], pixels[i], float(scores[i]), boxes[i], float(areas[i]),
                                  None if soft is None else soft[i], "none" if guide is None else "guided"))
    label_map = None
    if best is not None and best_index is not None:
        label_map = to_host(torch.where(best >= 0, best_index, 0))
    return out, label_map


def logits_to_masks(
    logits: torch.Tensor, *, prompts: list[str], height: int, width: int, threshold: float
) -> list[PromptMask]:
    """Binary masks (and stats) alone."""
    return upsample(logits, prompts=prompts, height=height, width=width, threshold=threshold)[0]
