"""The fast CLIPSeg path.

Compared with the stock call (image repeated per prompt, all vision layers), per batch it:
- runs the vision encoder once per image, and only up to the deepest layer in
  `config.extract_layers` (the decoder reads nothing later; the pooled output is unused);
- expands those activations per prompt (an index_select) for the light decoder;
- takes text embeddings from a bounded LRU cache keyed by label (its tuple of phrasings; a label
  with several phrasings gets their ensemble, computed once);
- stacks images from many jobs into one forward pass;
- resizes and normalises on the device (antialiased bilinear, like the processor's PIL resize),
  and upsamples/thresholds on the device (postprocess.py).
Everything it reads (sizes, mean/std, layers) comes from the checkpoint's own files.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine.loading import LoadedModel
from worker.engine.postprocess import SegmentResult, Wanted, upsample

Phrasings = tuple[str, ...]


@dataclass
class SegmentRequest:
    image: Image.Image | np.ndarray  # RGB; an (H, W, 3) uint8 array is used as is
    prompts: list[str]  # one name per label (a text prompt is its own name)
    threshold: float
    phrasings: list[Phrasings] | None = None  # per label; None: each prompt is its label's one phrasing
    wanted: Wanted = Wanted()
    # (width, height) of the outputs; None: the image's own. A JPEG decoded at a reduced scale for
    # the model (shared.images.decode) still gets masks at the full picture's size.
    size: tuple[int, int] | None = None

    def output_size(self, arr: np.ndarray) -> tuple[int, int]:
        return self.size if self.size is not None else (arr.shape[1], arr.shape[0])

    def label_keys(self) -> list[Phrasings]:
        if self.phrasings is None:
            return [(p,) for p in self.prompts]
        if len(self.phrasings) != len(self.prompts) or not all(self.phrasings):
            raise ValueError("each label needs one or more phrasings")
        return [tuple(p) for p in self.phrasings]


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """Prompt ensembling as CLIP's zero-shot classifiers do it: the mean of the unit-length
    phrasing embeddings, renormalised, then given the phrasings' mean length, since CLIPSeg's
    decoder is conditioned on unnormalised embeddings (FiLM)."""
    if embeddings.shape[0] == 1:
        return embeddings[0]
    norms = embeddings.norm(dim=-1, keepdim=True)
    direction = (embeddings / norms).mean(dim=0)
    return direction / direction.norm() * norms.mean()


def as_uint8_array(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError("images must be RGB uint8 (H, W, 3)")
    return arr


class TextEmbeddingCache:
    """label (tuple of phrasings) -> conditional embedding, least recently used evicted beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Phrasings, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_many(self, prompts: Sequence[Phrasings],
                 compute: Callable[[list[Phrasings]], torch.Tensor]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._items))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        fresh: dict[Phrasings, torch.Tensor] = {}
        if missing:
            embeddings = compute(missing)
            fresh = dict(zip(missing, embeddings, strict=True))
        rows = []
        for prompt in prompts:
            if prompt in fresh:
                rows.append(fresh[prompt])
            else:
                self._items.move_to_end(prompt)
                rows.append(self._items[prompt])
        if self.capacity > 0:
            for prompt, emb in fresh.items():
                self._items[prompt] = emb
                self._items.move_to_end(prompt)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return torch.stack(rows)

    def __len__(self) -> int:
        return len(self._items)


class FastEngine:
    def __init__(self, loaded: LoadedModel, *, text_cache_size: int = 4096, compile: bool = False) -> None:
        self.loaded = loaded
        model = loaded.model
        self.extract_layers = list(model.config.extract_layers)
        self.depth = max(self.extract_layers) + 1
        vision = model.clip.vision_model
        self._vision_layers = list(vision.encoder.layers[: self.depth])
        params = inspect.signature(self._vision_layers[0].forward).parameters
        # transformers < 5 layers take (hidden, attention_mask, causal_attention_mask) and return a tuple
        self._layer_extra: tuple[None, ...] = (None, None) if "causal_attention_mask" in params else (None,)
        pre = loaded.preprocessing
        dev, dtype = loaded.device, loaded.dtype
        self._mean = torch.tensor(pre.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self.text_cache = TextEmbeddingCache(text_cache_size)
        self._lock = threading.Lock()
        self._vision_fn: Callable[[torch.Tensor], list[torch.Tensor]] = self._vision
        self._decoder_fn: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] = self._decode
        if compile:
            self._vision_fn = torch.compile(self._vision, dynamic=True)
            self._decoder_fn = torch.compile(self._decode, dynamic=True)
        self.dtype = dtype

    # ---- stages ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) arrays -> normalised (B, 3, S, S) in the model dtype, on the device."""
        pre, dev = self.loaded.preprocessing, self.loaded.device
        batch = []
        for arr in images:
            t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=not arr.flags.writeable))
            if dev.type == "cuda":
                t = t.pin_memory().to(dev, non_blocking=True)
            t = t.permute(2, 0, 1).unsqueeze(0).float()
            if t.shape[-2:] != (pre.height, pre.width):
                t = F.interpolate(t, size=(pre.height, pre.width), mode="bilinear", antialias=True,
                                  align_corners=False)
                t = t.round_().clamp_(0, 255)  # the processor resizes in PIL, on uint8 levels
            batch.append(t)
        pixels = torch.cat(batch).mul_(pre.rescale)
        return ((pixels - self._mean) / self._std).to(self.dtype)

    def _vision(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        vision = self.loaded.model.clip.vision_model
        hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        wanted = set(self.extract_layers)
        activations = []
        for index, layer in enumerate(self._vision_layers):
            hidden = layer(hidden, *self._layer_extra)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if index in wanted:
                activations.append(hidden)
        return activations

    def _decode(self, activations: list[torch.Tensor], conditional: torch.Tensor) -> torch.Tensor:
        return self.loaded.model.decoder(activations, conditional).logits

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        lm = self.loaded
        tokens = lm.tokenizer(prompts, padding=True, return_tensors="pt")
        return lm.model.get_conditional_embeddings(
            batch_size=len(prompts),
            input_ids=tokens["input_ids"].to(lm.device),
            attention_mask=tokens["attention_mask"].to(lm.device),
        )

    def _label_embeddings(self, labels: list[Phrasings]) -> torch.Tensor:
        """One text-model pass for every distinct phrasing, then one embedding per label."""
        phrases = list(dict.fromkeys(p for label in labels for p in label))
        embeddings = self._text_embeddings(phrases)
        row = {phrase: index for index, phrase in enumerate(phrases)}
        return torch.stack([ensemble(embeddings[[row[p] for p in label]]) for label in labels])

    # ---- public -----------------------------------------------------------------------------
    @torch.inference_mode()
    def batch_logits(self, images: Sequence[np.ndarray],
                     labels: Sequence[list[str]] | Sequence[list[Phrasings]]) -> list[torch.Tensor]:
        """Per image, (P_i, h, w) float32 logits on the device; one vision pass for the batch."""
        return self.logits_from_pixels(self.preprocess(images), labels)

    @torch.inference_mode()
    def logits_from_pixels(self, pixels: torch.Tensor,
                           labels: Sequence[list[str]] | Sequence[list[Phrasings]]) -> list[torch.Tensor]:
        """The model part alone, from normalised (B, 3, S, S) pixel values. Per image, its labels:
        prompt strings, or tuples of phrasings (ensembled)."""
        pixels = pixels.to(self.loaded.device, self.dtype)
        activations = self._vision_fn(pixels)
        counts = [len(p) for p in labels]
        index = torch.repeat_interleave(torch.arange(len(counts), device=pixels.device),
                                        torch.tensor(counts, device=pixels.device))
        flat = [label if isinstance(label, tuple) else (label,) for group in labels for label in group]
        with self._lock:
            conditional = self.text_cache.get_many(flat, self._label_embeddings)
        expanded = [a.index_select(0, index) for a in activations]
        logits = self._decoder_fn(expanded, conditional.to(self.dtype)).float()
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        return list(torch.split(logits, counts))

    @torch.inference_mode()
    def segment_batch(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        arrays = [as_uint8_array(r.image) for r in requests]
        per_image = self.batch_logits(arrays, [r.label_keys() for r in requests])
        results = []
        for req, arr, logits in zip(requests, arrays, per_image, strict=True):
            width, height = req.output_size(arr)
            masks, label_map = upsample(logits, prompts=req.prompts, height=height, width=width,
                                        threshold=req.threshold, wanted=req.wanted)
            results.append(SegmentResult(masks, logits.cpu(), label_map))
        return results

    def segment(self, image: Image.Image | np.ndarray, prompts: list[str], threshold: float) -> SegmentResult:
        return self.segment_batch([SegmentRequest(image, prompts, threshold)])[0]
