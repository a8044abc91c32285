"""The stock transformers way: processor + model per job, the image repeated once per prompt.

This is what a user of `CLIPSegForImageSegmentation` writes. It is the reference that the fast
engine must match (tests) and beat (bench/engine.py).
"""

from __future__ import annotations

import torch
from PIL import Image

from worker.engine.loading import LoadedModel
from worker.engine.postprocess import SegmentResult, logits_to_masks


class StockEngine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @torch.inference_mode()
    def stock_logits(self, image: Image.Image, prompts: list[str]) -> torch.Tensor:
        """(P, h, w) float32 logits exactly as `model(**processor(...))` gives them."""
        lm = self.loaded
        inputs = lm.processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
        inputs = {name: value.to(lm.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
        logits = lm.model(**inputs).logits
        if logits.dim() == 2:  # transformers squeezes a single prompt's batch dimension away
            logits = logits.unsqueeze(0)
        return logits.float()

    def segment(self, image: Image.Image, prompts: list[str], threshold: float) -> SegmentResult:
        logits = self.stock_logits(image, prompts)
        masks = logits_to_masks(logits, prompts=prompts, height=image.height, width=image.width,
                                threshold=threshold)
        return SegmentResult(masks, logits.cpu())
