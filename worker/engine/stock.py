"""The stock transformers way: processor + model per job, the image repeated once per prompt.

This is what a user of `CLIPSegForImageSegmentation` writes. It is the reference that the fast
engine must match (tests) and beat (bench/engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from worker.engine import refine
from worker.engine.embed import VisualPrompt, ensemble, features, masked_crop, neutral_grey, unit
from worker.engine.loading import LoadedModel
from worker.engine.postprocess import upsample
from worker.engine.types import EmbedQuery, LabelKey, LearnedLabel, SegmentRequest, SegmentResult, as_uint8_array


class StockEngine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @torch.inference_mode()
    def stock_logits(self, image: Image.Image, prompts: list[str]) -> torch.Tensor:
        """(P, h, w) float32 logits exactly as `model(**processor(...))` gives them."""
        lm = self.loaded
        inputs = lm.processor(text=prompts, images=[image] * len(prompts), padding=True,
                              truncation=True, return_tensors="pt")
        inputs = {name: value.to(lm.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
        logits = lm.model(**inputs).logits
        if logits.dim() == 2:  # transformers squeezes a single prompt's batch dimension away
            logits = logits.unsqueeze(0)
        return logits.float()

    @torch.inference_mode()
    def visual_prompt_logits(self, image: Image.Image, examples: list[Image.Image]) -> torch.Tensor:
        """(P, h, w) logits of CLIPSeg's visual prompts, exactly as
        `model(pixel_values=..., conditional_pixel_values=...)` gives them."""
        lm = self.loaded
        pixels = lm.processor(images=[image] * len(examples), return_tensors="pt")["pixel_values"]
        conditional = lm.processor(images=examples, return_tensors="pt")["pixel_values"]
        logits = lm.model(pixel_values=pixels.to(lm.device, lm.dtype),
                          conditional_pixel_values=conditional.to(lm.device, lm.dtype)).logits
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        return logits.float()

    def _conditional(self, labels: list[LabelKey]) -> torch.Tensor:
        lm = self.loaded
        phrases = list(dict.fromkeys(p for label in labels if isinstance(label, tuple) for p in label))
        row = {phrase: index for index, phrase in enumerate(phrases)}
        embeddings = None
        if phrases:
            tokens = lm.processor(text=phrases, padding=True, truncation=True, return_tensors="pt")
            embeddings = lm.model.get_conditional_embeddings(
                batch_size=len(phrases), input_ids=tokens["input_ids"].to(lm.device),
                attention_mask=tokens["attention_mask"].to(lm.device))
        rows = []
        for label in labels:
            if isinstance(label, LearnedLabel):
                rows.append(label.embedding.to(lm.device))
            elif isinstance(label, VisualPrompt):
                example = lm.processor(images=[Image.fromarray(label.pixels)], return_tensors="pt")["pixel_values"]
                rows.append(lm.model.get_conditional_embeddings(
                    batch_size=1, conditional_pixel_values=example.to(lm.device, lm.dtype))[0])
            else:
                assert embeddings is not None
                assert isinstance(label, tuple)
                rows.append(ensemble(embeddings[[row[p] for p in label]]))
        return torch.stack([r.to(lm.dtype) for r in rows])

    @torch.inference_mode()
    def ensemble_logits(self, image: Image.Image, labels: list[LabelKey]) -> torch.Tensor:
        """Labels with several phrasings (or example images): the model called with their
        ensembled conditional embeddings."""
        lm = self.loaded
        conditional = self._conditional(labels)
        pixels = lm.processor(images=[image] * len(labels), return_tensors="pt")["pixel_values"]
        logits = lm.model(pixel_values=pixels.to(lm.device, lm.dtype), conditional_embeddings=conditional).logits
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        return logits.float()

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised `clip.get_image_features` of the processor's pixels: the plain way."""
        lm = self.loaded
        pixels = lm.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return unit(features(lm.model.clip.get_image_features(pixels.to(lm.device, lm.dtype))))

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        lm = self.loaded
        tokens = lm.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        return unit(features(lm.model.clip.get_text_features(
            input_ids=tokens["input_ids"].to(lm.device), attention_mask=tokens["attention_mask"].to(lm.device))))

    def run(self, request: SegmentRequest) -> SegmentResult:
        if request.decoder is not None:
            from shared.errors import JobFailure

            raise JobFailure("fine-tuned models run on the fast engine (CLIPMASK_ENGINE=fast)",
                             code="model_unsupported")
        image = request.image
        if not isinstance(image, Image.Image):
            image = Image.fromarray(as_uint8_array(image))
        labels = request.label_keys()
        if not labels:
            logits = torch.zeros((0, 1, 1))
        elif all(isinstance(label, tuple) and len(label) == 1 for label in labels):
            logits = self.stock_logits(image, [label[0] for label in labels])  # type: ignore[index]
        else:
            logits = self.ensemble_logits(image, labels)
        width, height = request.size or image.size
        masks, label_map = upsample(logits, prompts=request.prompts, height=height, width=width,
                                    threshold=request.threshold, wanted=request.wanted,
                                    guide=refine.request_guide(request, np.asarray(image), self.loaded.device))
        result = SegmentResult(masks, logits.cpu(), label_map)
        if request.embed_image:
            result.image_embedding = self.image_embeddings([image])[0]
        if request.embed_masks:
            arr, grey = as_uint8_array(np.asarray(image)), neutral_grey(self.loaded.preprocessing.mean)
            crops = [masked_crop(arr, m.mask, m.bbox, grey) for m in masks]
            present = [Image.fromarray(c) for c in crops if c is not None]
            vectors = iter(self.image_embeddings(present)) if present else iter(())
            result.mask_embeddings = [None if c is None else next(vectors) for c in crops]
        return result

    def embed_query(self, query: EmbedQuery) -> np.ndarray:
        if query.text is not None:
            return self.text_embeddings([query.text])[0]
        if query.image is None:
            raise ValueError("a query needs a text or an image")
        return self.image_embeddings([Image.fromarray(as_uint8_array(query.image))])[0]

    def segment(self, image: Image.Image, prompts: list[str], threshold: float) -> SegmentResult:
        return self.run(SegmentRequest(image, prompts, threshold))
