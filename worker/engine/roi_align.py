"""torchvision.ops.roi_align in plain torch, for SAM 3's box prompts without torchvision.

transformers' SAM 3 geometry encoder pools each box prompt's features with
`torchvision.ops.roi_align(features, boxes, roi_size)` (spatial_scale 1, sampling_ratio -1, not
aligned). PyPI's torchvision does not import beside the CPU torch this project pins (README:
"SAM 3 and torchvision"), so this module gives the same function: for each box, each output bin
averages ceil(roi / bins) x ceil(roi / bins) bilinear samples, a sample outside [-1, size] counts
as 0, as in torchvision's kernel. Bilinear sampling is separable and so is that rule, so a box's
pooling is two small matrices (bins x height, bins x width) around its feature map:
out[c] = Y @ F[c] @ X^T. tests/worker/test_sam3.py checks it against torchvision itself, in the
reference environment (`make stock-venv`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch


def _axis_weights(start: float, length: float, bins: int, size: int, device: torch.device) -> torch.Tensor:
    """(bins, size): row b averages the bilinear weights of bin b's samples along one axis."""
    grid = max(1, math.ceil(length / bins))
    step = length / bins
    k = torch.arange(bins * grid, device=device, dtype=torch.float64)
    pos = start + (k // grid) * step + ((k % grid) + 0.5) * (step / grid)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    pos = torch.where(at_end, low.double(), pos)
    frac = pos - low
    weights = torch.zeros(bins * grid, size, dtype=torch.float64, device=device)
    rows = torch.arange(bins * grid, device=device)
    weights.index_put_((rows, low), (1.0 - frac) * valid, accumulate=True)
    weights.index_put_((rows, high), frac * valid, accumulate=True)
    return weights.view(bins, grid, size).mean(dim=1)


def roi_align(input: torch.Tensor, boxes: Sequence[torch.Tensor] | torch.Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """torchvision.ops.roi_align for sampling_ratio -1 and aligned False (what SAM 3 calls): input
    (N, C, H, W), boxes a list of (K_i, 4) x0 y0 x1 y1 per image (or a (K, 5) tensor with the
    image index first); returns (sum K_i, C, out_h, out_w)."""
    if sampling_ratio != -1 or aligned:
        raise NotImplementedError("only sampling_ratio=-1, aligned=False (SAM 3's call)")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if isinstance(boxes, torch.Tensor):
        rois = boxes
    else:
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                          for i, b in enumerate(boxes)]) if len(boxes) else input.new_zeros((0, 5))
    height, width = input.shape[-2:]
    features = input.double()
    out = []
    for image, x0, y0, x1, y1 in rois.double().tolist():
        x0, y0, x1, y1 = x0 * spatial_scale, y0 * spatial_scale, x1 * spatial_scale, y1 * spatial_scale
        ys = _axis_weights(y0, max(y1 - y0, 1.0), out_h, height, input.device)
        xs = _axis_weights(x0, max(x1 - x0, 1.0), out_w, width, input.device)
        out.append(torch.einsum("ph,chw,qw->cpq", ys, features[int(image)], xs))
    if not out:
        return input.new_zeros((0, input.shape[1], out_h, out_w))
    return torch.stack(out).to(input.dtype)


def install_for_sam3() -> bool:
    """Give transformers' SAM 3 this roi_align where torchvision is missing (its module then has no
    `torchvision` name, and a box prompt would raise NameError). Returns whether it was installed."""
    from transformers.models.sam3 import modeling_sam3

    if getattr(modeling_sam3, "torchvision", None) is not None:
        return False
    modeling_sam3.torchvision = types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=roi_align))
    return True
