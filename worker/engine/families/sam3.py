"""The SAM 3 family: promptable concept segmentation with transformers' `Sam3Model`.

For a text prompt SAM 3's DETR-style decoder proposes up to `num_queries` instances, each with a
score logit, a box and mask logits, plus one presence logit for the concept as a whole. What a job
gets is exactly what `Sam3Processor.post_process_instance_segmentation(outputs, threshold=t,
mask_threshold=0.5, target_sizes=[(H, W)])` keeps (checked in tests/worker/test_sam3.py against the
stock pipeline): an instance's score is sigmoid(logit) x sigmoid(presence), kept when above t; its
mask is sigmoid(mask logits) upsampled bilinearly to the image, above 0.5. A label's mask is the
union of its kept instances, its probability map the largest kept instance probability (0 where
none), its score the best kept instance's score (0 when none), and it gains `presence`.

Per batch of requests (from many jobs) the engine:
- preprocesses on the device (antialiased bilinear resize to the checkpoint's size, its mean and
  std; no torchvision: README "SAM 3 and torchvision");
- runs the vision encoder once per image, whatever the number of prompts (the model takes
  precomputed `vision_embeds`);
- takes text embeddings from a bounded LRU cache (tokenized to the text encoder's 32 positions,
  truncated past them: stock `Sam3Model` crashes on longer text, the processor pads without
  truncating);
- runs the DETR encoder, decoder and mask decoder on (image, prompt) pairs across the batch,
  `pair_chunk` pairs a pass, and upsamples only the kept instances.
Box prompts (exemplars) run as stock transformers runs boxes without text: text "visual", boxes
normalised cx cy w h, labels 1 (positive) and 0 (negative).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine import refine as refine_methods
from worker.engine.fast import TextEmbeddingCache
from worker.engine.loading import (
    DTYPES,
    LoadedModel,
    Preprocessing,
    checkpoint_revision,
    resolve_cpu_dtype,
    resolve_device,
)
from worker.engine.postprocess import _bboxes, to_host
from worker.engine.types import (
    BoxPrompt,
    EmbedQuery,
    Instance,
    LabelKey,
    PromptMask,
    SegmentRequest,
    SegmentResult,
    as_uint8_array,
)

log = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5  # the contract's: an instance's pixels are its probabilities above 0.5
VISUAL_TEXT = "visual"  # the text stock transformers pairs with boxes given without text
# upsample at most this many instance pixels at once (instances x H x W): 256 MiB of float32
MAX_UPSAMPLE_ELEMENTS = 64 * 1024 * 1024


def read_sam3_preprocessing(source: str) -> Preprocessing:
    """The checkpoint's image preprocessing from its processor files (processor_config.json's
    image_processor, or preprocessor_config.json), read as JSON: Sam3ImageProcessor itself needs
    torchvision."""
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data = data.get("image_processor", data)
        size = data.get("size", {"height": 1008, "width": 1008})
        rescale = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
        normalize = data.get("do_normalize", True)
        mean = data.get("image_mean", [0.5] * 3) if normalize else [0.0] * 3
        std = data.get("image_std", [0.5] * 3) if normalize else [1.0] * 3
        return Preprocessing(int(size["height"]), int(size["width"]), rescale, tuple(mean), tuple(std))
    raise FileNotFoundError(f"{source}: no processor_config.json or preprocessor_config.json")


def load_sam3(source: str, *, device: str = "auto", dtype: str = "bf16", cpu_dtype: str = "fp32") -> LoadedModel:
    """Load a SAM 3 checkpoint (hub id like facebook/sam3, or a directory) once, as load_clipseg does."""
    from transformers import AutoTokenizer, Sam3Model

    from worker.engine.roi_align import install_for_sam3

    if install_for_sam3():
        log.info("torchvision is not installed: SAM 3 box prompts pool with worker/engine/roi_align.py")
    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype] if dev.type == "cuda" else resolve_cpu_dtype(cpu_dtype)
    model = Sam3Model.from_pretrained(source, dtype=torch_dtype).to(dev).eval()  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Text past the encoder's positions (32) is truncated: stock Sam3Model fails on it.
    tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    where = "directory" if Path(source).is_dir() else "hub"
    log.info("loaded SAM 3 from %s %s on %s (%s)", where, source, dev, torch_dtype)
    return LoadedModel(model, None, tokenizer, read_sam3_preprocessing(source), dev, torch_dtype, source,
                       checkpoint_revision(source, model))


@dataclass
class _Pair:
    request: int  # index of the request in the batch
    label: int  # index of the label in the request
    text: str  # what the text encoder reads ("visual" for boxes)
    boxes: BoxPrompt | None = None


class Sam3Engine:
    def __init__(self, loaded: LoadedModel, *, text_cache_size: int = 4096, pair_chunk: int | None = None) -> None:
        self.loaded = loaded
        self.jpeg_decoder = None  # requests come decoded
        model = loaded.model
        self.text_positions = int(model.config.text_config.max_position_embeddings)
        # (image, prompt) pairs per DETR pass: each holds its image's features at every FPN level
        self.pair_chunk = pair_chunk or (64 if loaded.device.type == "cuda" else 4)
        pre = loaded.preprocessing
        dev = loaded.device
        self._mean = torch.tensor(pre.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self.text_cache = TextEmbeddingCache(text_cache_size)
        self.dtype = loaded.dtype
        self._lock = threading.Lock()

    # ---- stages ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) arrays -> normalised (B, 3, S, S) in the model dtype, on the device."""
        pre = self.loaded.preprocessing
        dev = self.loaded.device
        batch = []
        for arr in images:
            host = np.array(arr, dtype=np.uint8, copy=not arr.flags.writeable)
            t = torch.from_numpy(host).to(dev).permute(2, 0, 1).unsqueeze(0).float()
            if t.shape[-2:] != (pre.height, pre.width):
                t = F.interpolate(t, size=(pre.height, pre.width), mode="bilinear", antialias=True,
                                  align_corners=False).round_().clamp_(0, 255)
            batch.append(t)
        pixels = torch.cat(batch).mul_(pre.rescale)
        return ((pixels - self._mean) / self._std).to(self.dtype)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, positions, hidden + 1): the projected text features, and the attention mask as the last column."""
        tok = self.loaded.tokenizer(texts, padding="max_length", max_length=self.text_positions, truncation=True,
                                    return_tensors="pt")
        ids = tok["input_ids"].to(self.loaded.device)
        mask = tok["attention_mask"].to(self.loaded.device)
        features = self.loaded.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return torch.cat([features, mask.unsqueeze(-1).to(features.dtype)], dim=-1)

    def texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, positions, hidden), attention mask (N, positions)), through the cache."""
        rows = self.text_cache.get_many([(t,) for t in texts], lambda keys: self._encode_texts(
            [k[0] for k in keys if isinstance(k, tuple)]))
        return rows[..., :-1], rows[..., -1].long()

    def _pairs(self, requests: Sequence[SegmentRequest]) -> list[_Pair]:
        pairs = []
        for i, req in enumerate(requests):
            for j, key in enumerate(req.label_keys()):
                pairs.append(self._pair(i, j, key))
        return pairs

    @staticmethod
    def _pair(request: int, label: int, key: LabelKey) -> _Pair:
        if isinstance(key, BoxPrompt):
            return _Pair(request, label, VISUAL_TEXT, key)
        if isinstance(key, tuple):
            # a preset label's first phrasing: SAM 3 reads one noun phrase per prompt (several phrasings
            # would find the same garment several times over)
            return _Pair(request, label, key[0])
        raise ValueError(f"SAM 3 segments text and box prompts, not {type(key).__name__}")

    def _forward(self, vision: Any, pairs: list[_Pair], image_index: list[int],
                 sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Sam3Model on some pairs: their image's vision features and their prompt."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        model = self.loaded.model
        dev = self.loaded.device
        index = torch.tensor(image_index, device=dev)
        embeds = type(vision)(fpn_hidden_states=tuple(h.index_select(0, index) for h in vision.fpn_hidden_states),
                              fpn_position_encoding=tuple(p.index_select(0, index)
                                                          for p in vision.fpn_position_encoding))
        features, mask = self.texts([p.text for p in pairs])
        kwargs: dict[str, Any] = {}
        if any(p.boxes is not None for p in pairs):
            kwargs.update(self._box_inputs(pairs, [sizes[i] for i in image_index]))
        out = model(vision_embeds=embeds, text_embeds=BaseModelOutputWithPooling(pooler_output=features),
                    attention_mask=mask, **kwargs)
        return {"logits": out.pred_logits, "presence": out.presence_logits, "masks": out.pred_masks}

    def _box_inputs(self, pairs: list[_Pair], sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Boxes as Sam3Processor gives them: cx cy w h normalised by the image's size, label 1 or 0,
        padding labelled -10."""
        count = max(len(p.boxes.boxes) + len(p.boxes.negative_boxes) for p in pairs if p.boxes is not None)
        boxes = torch.zeros(len(pairs), count, 4, dtype=torch.float32)
        labels = torch.full((len(pairs), count), -10, dtype=torch.long)
        for row, (pair, (width, height)) in enumerate(zip(pairs, sizes, strict=True)):
            if pair.boxes is None:
                continue
            given = [(b, 1) for b in pair.boxes.boxes] + [(b, 0) for b in pair.boxes.negative_boxes]
            for col, ((x0, y0, x1, y1), label) in enumerate(given):
                boxes[row, col] = torch.tensor([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                                (x1 - x0) / width, (y1 - y0) / height])
                labels[row, col] = label
        dev = self.loaded.device
        return {"input_boxes": boxes.to(dev, self.dtype), "input_boxes_labels": labels.to(dev)}

    def raw_outputs(self, requests: Sequence[SegmentRequest], arrays: list[np.ndarray],
                    pixels: torch.Tensor | None = None) -> tuple[list[_Pair], dict[str, torch.Tensor]]:
        """Every (image, prompt) pair's logits, presence logit and mask logits (float32), in pair order."""
        if pixels is None:
            pixels = self.preprocess(arrays)
        pixels = pixels.to(self.loaded.device, self.dtype)
        vision = self.loaded.model.get_vision_features(pixel_values=pixels)
        sizes = [(a.shape[1], a.shape[0]) for a in arrays]
        pairs = self._pairs(requests)
        # text pairs and box pairs go in separate passes: a pass with boxes runs the geometry encoder for all
        order = sorted(range(len(pairs)), key=lambda k: pairs[k].boxes is not None)
        parts: dict[str, list[torch.Tensor]] = {"logits": [], "presence": [], "masks": []}
        done: list[int] = []
        for start in range(0, len(order), self.pair_chunk):
            chunk = order[start: start + self.pair_chunk]
            boxed = {pairs[k].boxes is not None for k in chunk}
            groups = [[k for k in chunk if (pairs[k].boxes is not None) == b] for b in sorted(boxed)]
            for group in groups:
                out = self._forward(vision, [pairs[k] for k in group], [pairs[k].request for k in group], sizes)
                for name, value in out.items():
                    parts[name].append(value.float())
                done += group
        if not pairs:
            return pairs, {}
        back = torch.tensor(np.argsort(done), device=self.loaded.device)
        return pairs, {name: torch.cat(values).index_select(0, back) for name, values in parts.items()}

    @torch.inference_mode()
    def segment_batch(self, requests: Sequence[SegmentRequest],
                      pixels: torch.Tensor | None = None) -> list[SegmentResult]:
        """`pixels`: the images already preprocessed (the stock-equivalence test feeds the processor's)."""
        for req in requests:
            if req.decoder is not None or req.embed_image or req.embed_masks:
                raise ValueError("SAM 3 has no fine-tuned decoders or CLIP embeddings")
        arrays = [as_uint8_array(r.image) for r in requests]
        pairs, raw = self.raw_outputs(requests, arrays, pixels)
        results = []
        start = 0
        for i, (req, arr) in enumerate(zip(requests, arrays, strict=True)):
            count = sum(1 for p in pairs if p.request == i)
            rows = slice(start, start + count)
            start += count
            width, height = req.output_size(arr)
            per_label = ([float(req.threshold)] * count if isinstance(req.threshold, int | float)
                         else [float(t) for t in req.threshold])
            guide = refine_methods.request_guide(req, arr, self.loaded.device)
            masks, label_map, low = self._labels(
                req, {k: v[rows] for k, v in raw.items()} if count else {}, per_label, height, width, guide)
            results.append(SegmentResult(masks, low, label_map))
        return results

    def _labels(self, req: SegmentRequest, raw: dict[str, torch.Tensor], thresholds: list[float], height: int,
                width: int, guide: torch.Tensor | None) -> tuple[list[PromptMask], np.ndarray | None, torch.Tensor]:
        """Each label's kept instances, union mask, probability map and stats at (height, width)."""
        dev = self.loaded.device
        out: list[PromptMask] = []
        best = best_index = None
        if req.wanted.label_map:
            best = torch.full((height, width), -1.0, device=dev)
            best_index = torch.zeros((height, width), dtype=torch.uint8, device=dev)
        low = []
        for j, name in enumerate(req.prompts):
            scores = raw["logits"][j].sigmoid() * raw["presence"][j].sigmoid()
            presence = float(raw["presence"][j].sigmoid().item())
            keep = torch.nonzero(scores > thresholds[j]).flatten()
            keep = keep[scores[keep].argsort(descending=True, stable=True)]  # best first
            mask_logits = raw["masks"][j]
            low.append(mask_logits.amax(dim=0) if len(mask_logits) else mask_logits.new_zeros(mask_logits.shape[1:]))
            if not (torch.isfinite(raw["logits"][j]).all() and torch.isfinite(raw["presence"][j]).all()):
                low[-1] = low[-1] + float("nan")  # the runner's finiteness check fails the job model_output_invalid
            prob = torch.zeros((height, width), device=dev)
            instances: list[Instance] = []
            step = max(1, MAX_UPSAMPLE_ELEMENTS // (height * width))
            for s in range(0, len(keep), step):
                part = keep[s: s + step]
                up = F.interpolate(mask_logits[part].sigmoid().unsqueeze(0), size=(height, width), mode="bilinear",
                                   align_corners=False).squeeze(0)
                prob = torch.maximum(prob, up.amax(dim=0))
                if req.wanted.instances:
                    own = up > MASK_THRESHOLD
                    boxes = _bboxes(own)
                    pixels = to_host(own)
                    part_scores = scores[part].tolist()
                    for k in range(len(part)):
                        instances.append(Instance(pixels[k], float(part_scores[k]), boxes[k]))
                del up
            if guide is not None:
                prob = refine_methods.guided(prob.unsqueeze(0), guide).squeeze(0)
            union = prob > MASK_THRESHOLD
            if best is not None and best_index is not None:
                better = union & (prob > best)
                best = torch.where(better, prob, best)
                best_index = torch.where(better, torch.tensor(j + 1, dtype=torch.uint8, device=dev), best_index)
            ones = union.view(torch.uint8).unsqueeze(0)
            box = _bboxes(ones)[0]
            pixels = to_host(ones[0] * 255)
            score = float(scores[keep[0]].item()) if len(keep) else 0.0
            soft = to_host((prob * 255).round_().to(torch.uint8)) if req.wanted.soft else None
            out.append(PromptMask(name, pixels, score, box, np.count_nonzero(pixels) / (height * width), soft,
                                  "none" if guide is None else "guided",
                                  instances=instances if req.wanted.instances else None, presence=presence))
        label_map = None
        if best is not None and best_index is not None:
            label_map = to_host(torch.where(best >= 0, best_index, 0))
        logits = torch.stack(low).cpu() if low else torch.zeros((0, 1, 1))
        return out, label_map, logits

    def run_batch(self, items: Sequence[SegmentRequest | EmbedQuery]) -> list[SegmentResult]:
        if any(isinstance(item, EmbedQuery) for item in items):
            raise ValueError("SAM 3 makes no CLIP embeddings (search queries need a CLIPSeg base)")
        return self.segment_batch([r for r in items if isinstance(r, SegmentRequest)])

