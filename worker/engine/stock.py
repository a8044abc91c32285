"""The stock transformers way: processor + model per job, the image repeated once per prompt.

This is what a user of `CLIPSegForImageSegmentation` writes. It is the reference that the fast
engine must match (tests) and beat (bench/engine.py).
"""

from __future__ import annotations

import torch
from PIL import Image

from worker.engine.fast import SegmentRequest, ensemble
from worker.engine.loading import LoadedModel
from worker.engine.postprocess import SegmentResult, upsample


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

    @torch.inference_mode()
    def ensemble_logits(self, image: Image.Image, labels: list[tuple[str, ...]]) -> torch.Tensor:
        """Labels with several phrasings: the model called with their ensembled conditional embeddings."""
        lm = self.loaded
        phrases = list(dict.fromkeys(p for label in labels for p in label))
        tokens = lm.processor(text=phrases, padding=True, return_tensors="pt")
        embeddings = lm.model.get_conditional_embeddings(
            batch_size=len(phrases), input_ids=tokens["input_ids"].to(lm.device),
            attention_mask=tokens["attention_mask"].to(lm.device))
        row = {phrase: index for index, phrase in enumerate(phrases)}
        conditional = torch.stack([ensemble(embeddings[[row[p] for p in label]]) for label in labels])
        pixels = lm.processor(images=[image] * len(labels), return_tensors="pt")["pixel_values"]
        logits = lm.model(pixel_values=pixels.to(lm.device, lm.dtype), conditional_embeddings=conditional).logits
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        return logits.float()

    def run(self, request: SegmentRequest) -> SegmentResult:
        image = request.image if isinstance(request.image, Image.Image) else Image.fromarray(request.image)
        labels = request.label_keys()
        if all(len(label) == 1 for label in labels):
            logits = self.stock_logits(image, [label[0] for label in labels])
        else:
            logits = self.ensemble_logits(image, labels)
        width, height = request.size or image.size
        masks, label_map = upsample(logits, prompts=request.prompts, height=height, width=width,
                                    threshold=request.threshold, wanted=request.wanted)
        return SegmentResult(masks, logits.cpu(), label_map)

    def segment(self, image: Image.Image, prompts: list[str], threshold: float) -> SegmentResult:
        return self.run(SegmentRequest(image, prompts, threshold))
