"""The fast CLIPSeg path.

Compared with the stock call (image repeated per prompt, all vision layers), per batch it:
- runs the vision encoder once per image, and only up to the deepest layer in
  `config.extract_layers` (the decoder reads nothing later; the pooled output is unused);
- expands those activations per prompt (an index_select) for the light decoder;
- takes text embeddings from a bounded LRU cache keyed by label (its tuple of phrasings; a label
  with several phrasings gets their ensemble, computed once);
- stacks images from many jobs into one forward pass;
- resizes and normalises on the device (antialiased bilinear, like the processor's PIL resize),
  and upsamples/thresholds on the device (postprocess.py);
- on the CPU, runs the vision encoder in passes of about one real-checkpoint image's activations
  (measured with its architecture, bench/README.md: larger passes cost more per image, the
  activations no longer fitting the caches; a small model's images still go together, where
  per-pass overhead dominates), and the decoder in the same chunks;
- runs the decoder's per-image parts (the reductions of the vision activations) before they are
  repeated per label, and its stride-equals-kernel transposed convolutions as one matmul each.
Everything it reads (sizes, mean/std, layers) comes from the checkpoint's own files.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine import refine as refine_methods
from worker.engine.embed import VisualPrompt, ensemble, masked_crop, neutral_grey, unit
from worker.engine.jpeg import EncodedJpeg, JpegDecoder
from worker.engine.loading import LoadedModel
from worker.engine.postprocess import upsample
from worker.engine.types import (
    BoxPrompt,
    Decoder,
    EmbedQuery,
    LabelKey,
    LearnedLabel,
    Phrasings,
    SegmentRequest,
    SegmentResult,
    as_uint8_array,
)

# Hidden-state values per vision pass on the CPU: past about one real-checkpoint image, the
# activations stop fitting the caches and every image in the pass gets slower.
CPU_PASS_VALUES = 512 * 1024
CacheKey = Phrasings | str


def cache_key(label: LabelKey) -> CacheKey:
    """What the cache keeps a label under: its phrasings, or an example's content digest (never the
    example's pixels)."""
    if isinstance(label, VisualPrompt):
        return f"image:{label.digest}"
    assert not isinstance(label, BoxPrompt), "box prompts are SAM 3's (the runner refuses them on CLIPSeg)"
    return f"learned:{label.key}" if isinstance(label, LearnedLabel) else label


def _key_bytes(key: CacheKey) -> int:
    return len(key) if isinstance(key, str) else sum(len(p) for p in key) + 16 * len(key)


class TextEmbeddingCache:
    """label (tuple of phrasings, or a visual prompt by content digest) -> conditional embedding,
    least recently used evicted beyond `capacity` entries or `max_bytes` (embeddings and keys)."""

    def __init__(self, capacity: int, *, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(key: CacheKey, emb: torch.Tensor) -> int:
        return emb.numel() * emb.element_size() + _key_bytes(key)

    def get_many(self, prompts: Sequence[LabelKey],
                 compute: Callable[[list[LabelKey]], torch.Tensor]) -> torch.Tensor:
        keys = [cache_key(p) for p in prompts]
        missing = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in self._items}.items())
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        fresh: dict[CacheKey, torch.Tensor] = {}
        if missing:
            embeddings = compute([p for _, p in missing])
            fresh = dict(zip([k for k, _ in missing], embeddings, strict=True))
        rows = []
        for key in keys:
            if key in fresh:
                rows.append(fresh[key])
            else:
                self._items.move_to_end(key)
                rows.append(self._items[key])
        if self.capacity > 0:
            for key, emb in fresh.items():
                emb = emb.detach().clone()  # (not a view that keeps the whole batch's tensor alive)
                self._items[key] = emb
                self.bytes += self._size(key, emb)
                self._items.move_to_end(key)
            while self._items and (len(self._items) > self.capacity or self.bytes > self.max_bytes):
                key, emb = self._items.popitem(last=False)
                self.bytes -= self._size(key, emb)
        return torch.stack(rows)

    def __len__(self) -> int:
        return len(self._items)


def _layer_extra(layer: torch.nn.Module) -> tuple[None, ...]:
    """The positional Nones a transformer layer takes after its hidden states: transformers < 5
    layers take (hidden, attention_mask, causal_attention_mask) and return a tuple."""
    params = inspect.signature(layer.forward).parameters
    return (None, None) if "causal_attention_mask" in params else (None,)


def _stride_conv_transpose(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose2d whose stride equals its kernel (no padding, dilation or groups) writes
    each input pixel's k x k block alone: one (pixels, Cin) x (Cin, Cout*k*k) matmul, then a
    reshuffle. The conv's own kernel is slower on the CPU for CLIPSeg's decoder (bench/README.md)."""
    assert isinstance(module, torch.nn.ConvTranspose2d)
    cin, cout, kh, kw = module.weight.shape
    batch, _, height, width = x.shape
    y = x.permute(0, 2, 3, 1).reshape(-1, cin) @ module.weight.reshape(cin, cout * kh * kw)
    y = y.view(batch, height, width, cout, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(
        batch, cout, height * kh, width * kw)
    return y if module.bias is None else y + module.bias.view(1, -1, 1, 1)


def _is_block_conv_transpose(module: torch.nn.Module) -> bool:
    return (isinstance(module, torch.nn.ConvTranspose2d) and module.groups == 1
            and tuple(module.stride) == tuple(module.kernel_size) and tuple(module.padding) == (0, 0)
            and tuple(module.output_padding) == (0, 0) and tuple(module.dilation) == (1, 1))


class FastEngine:
    def __init__(self, loaded: LoadedModel, *, text_cache_size: int = 4096, compile: bool = False,
                 vision_chunk: int | None = None, max_decoders: int = 16,
                 jpeg_decoder: JpegDecoder | None = None) -> None:
        self.loaded = loaded
        # decodes requests' EncodedJpeg images, a batch at a time (worker/engine/jpeg.py); None: none come
        self.jpeg_decoder = jpeg_decoder
        model = loaded.model
        self.extract_layers = list(model.config.extract_layers)
        self.depth = max(self.extract_layers) + 1
        vision = model.clip.vision_model
        self._vision_layers = list(vision.encoder.layers[: self.depth])
        self._layer_extra = _layer_extra(self._vision_layers[0])
        decoder = model.decoder
        self._decoder_extra = _layer_extra(decoder.layers[0])
        # each upsampling step as it runs: the block transposed convs as matmuls, decided once here
        self._upconv: list[Callable[[torch.Tensor], torch.Tensor]] = self._upconv_steps(decoder)
        self._decoders: OrderedDict[str, torch.nn.Module] = OrderedDict()  # fine-tuned ones, by revision
        self.max_decoders = max_decoders
        vcfg = model.config.vision_config
        pre = loaded.preprocessing
        # tokens per image at the model's input size (the class token included)
        self.vision_tokens = (pre.height // vcfg.patch_size) * (pre.width // vcfg.patch_size) + 1
        # images per vision (and decoder) pass; 0 is the whole batch
        self.vision_chunk = self._default_chunk() if vision_chunk is None else vision_chunk
        pre = loaded.preprocessing
        dev, dtype = loaded.device, loaded.dtype
        self._grey = neutral_grey(pre.mean)
        self._mean = torch.tensor(pre.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self.text_cache = TextEmbeddingCache(text_cache_size)
        self._lock = threading.Lock()
        self._vision_fn: Callable[[torch.Tensor], list[torch.Tensor]] = self._vision
        self._decoder_fn: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor] = self._decode
        if compile:
            self._vision_fn = torch.compile(self._vision, dynamic=True)
            self._decoder_fn = torch.compile(self._decode, dynamic=True)
        self.dtype = dtype

    def _default_chunk(self) -> int:
        """The whole batch on an accelerator; on the CPU as many images as fit CPU_PASS_VALUES of
        hidden state (the real checkpoint: 485 tokens x 768 = 372,480, so one image a pass)."""
        if self.loaded.device.type != "cpu":
            return 0
        hidden = self.loaded.model.config.vision_config.hidden_size
        return max(1, CPU_PASS_VALUES // (self.vision_tokens * hidden))

    # ---- stages ---------------------------------------------------------------------------
    def _device_images(self, images: Sequence[np.ndarray | EncodedJpeg]) -> list[torch.Tensor]:
        """Each image as (3, H, W) uint8 on the device: arrays copied over (through pinned memory on
        CUDA), the batch's JPEGs decoded together by the jpeg decoder."""
        dev = self.loaded.device
        out: list[torch.Tensor | None] = [None] * len(images)
        jpegs = [(i, item) for i, item in enumerate(images) if isinstance(item, EncodedJpeg)]
        if jpegs:
            if self.jpeg_decoder is None:
                raise ValueError("an EncodedJpeg came to an engine without a jpeg_decoder")
            for (i, _), t in zip(jpegs, self.jpeg_decoder.decode([item for _, item in jpegs], dev), strict=True):
                out[i] = t
        for i, arr in enumerate(images):
            if isinstance(arr, EncodedJpeg):
                continue
            t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=not arr.flags.writeable))
            if dev.type == "cuda":
                t = t.pin_memory().to(dev, non_blocking=True)
            out[i] = t.permute(2, 0, 1)
        return [t for t in out if t is not None]

    def preprocess(self, images: Sequence[np.ndarray | EncodedJpeg]) -> torch.Tensor:
        """uint8 (H, W, 3) arrays (or JPEGs to decode here) -> normalised (B, 3, S, S) in the model
        dtype, on the device."""
        pre = self.loaded.preprocessing
        batch = []
        for image in self._device_images(images):
            t = image.unsqueeze(0).float()
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

    def _chunks(self, size: int) -> list[slice]:
        step = self.vision_chunk or size
        return [slice(start, start + step) for start in range(0, size, step)]

    def activations(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's vision activations for a batch, `vision_chunk` images per pass."""
        parts = [self._vision_fn(pixels[part]) for part in self._chunks(pixels.shape[0])]
        if len(parts) == 1:
            return parts[0]
        return [torch.cat(layer) for layer in zip(*parts, strict=True)]

    def _finish_vision(self, hidden: torch.Tensor) -> torch.Tensor:
        """From the hidden state after the last layer the decoder reads to CLIP's image features:
        the remaining layers, post layer norm on the class token, visual projection."""
        clip = self.loaded.model.clip
        vision = clip.vision_model
        for layer in vision.encoder.layers[self.depth:]:
            hidden = layer(hidden, *self._layer_extra)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return clip.visual_projection(vision.post_layernorm(hidden[:, 0, :]))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image features of normalised pixels, as `clip.get_image_features` gives them."""
        return self._finish_vision(self.activations(pixels.to(self.loaded.device, self.dtype))[-1])

    def _decode(self, activations: list[torch.Tensor], conditional: torch.Tensor, index: torch.Tensor,
                decoder: torch.nn.Module | None = None) -> torch.Tensor:
        """CLIPSegDecoder.forward for per-image activations and per-label conditional embeddings
        (label i belongs to image index[i]): the reductions run once per image, then repeat.
        `decoder`: a fine-tuned copy of the base's (self.tuned_decoder); None: the base's own."""
        upconv = self._upconv if decoder is None else self._upconv_steps(decoder)
        dec: Any = self.loaded.model.decoder if decoder is None else decoder
        output: torch.Tensor | None = None
        for i, (activation, layer, reduce) in enumerate(zip(activations[::-1], dec.layers, dec.reduces,
                                                            strict=False)):
            reduced = reduce(activation).index_select(0, index)
            output = reduced if output is None else reduced + output
            if i == dec.conditional_layer:
                output = (dec.film_mul(conditional).unsqueeze(1) * output
                          + dec.film_add(conditional).unsqueeze(1))
            output = layer(output, *self._decoder_extra)
            if isinstance(output, tuple):
                output = output[0]
        assert output is not None
        output = output[:, 1:, :].transpose(1, 2)  # drop the class token: (labels, reduce_dim, tokens)
        side = int(output.shape[2] ** 0.5)
        output = output.reshape(output.shape[0], output.shape[1], side, side)
        for step in upconv:
            output = step(output)
        return output.squeeze(1)

    @staticmethod
    def _upconv_steps(decoder: Any) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Each upsampling step as it runs: the block transposed convs as matmuls."""
        steps = decoder.transposed_convolution
        return [partial(_stride_conv_transpose, step) if _is_block_conv_transpose(step) else step
                for step in (steps if isinstance(steps, torch.nn.Sequential) else [steps])]

    def tuned_decoder(self, weights: Decoder) -> torch.nn.Module:
        """A copy of the base's decoder holding `weights`, kept for the last `max_decoders` revisions
        used (about 4.4 MB each in rd64), so a batch mixing models builds each once."""
        with self._lock:
            found = self._decoders.get(weights.revision)
            if found is not None:
                self._decoders.move_to_end(weights.revision)
                return found
        module = copy.deepcopy(self.loaded.model.decoder)
        module.load_state_dict({k.removeprefix("decoder."): v for k, v in weights.tensors.items()}, strict=True)
        module = module.to(self.loaded.device, self.dtype).eval()
        with self._lock:
            self._decoders[weights.revision] = module
            while len(self._decoders) > self.max_decoders:
                self._decoders.popitem(last=False)
        return module

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        lm = self.loaded
        tokens = lm.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")  # as CLIP: 77 tokens
        return lm.model.get_conditional_embeddings(
            batch_size=len(prompts),
            input_ids=tokens["input_ids"].to(lm.device),
            attention_mask=tokens["attention_mask"].to(lm.device),
        )

    def _label_embeddings(self, labels: list[LabelKey]) -> torch.Tensor:
        """One text-model pass for every distinct phrasing (one embedding per label, ensembled), and
        one vision pass for the example images, as `get_conditional_embeddings` computes them."""
        out: list[torch.Tensor | None] = [None] * len(labels)
        texts = [(i, label) for i, label in enumerate(labels) if isinstance(label, tuple)]
        visuals = [(i, label) for i, label in enumerate(labels) if isinstance(label, VisualPrompt)]
        for i, label in enumerate(labels):
            if isinstance(label, LearnedLabel):
                out[i] = label.embedding.to(self.loaded.device, self.dtype)
        if texts:
            phrases = list(dict.fromkeys(p for _, label in texts for p in label))
            embeddings = self._text_embeddings(phrases)
            row = {phrase: index for index, phrase in enumerate(phrases)}
            for i, label in texts:
                out[i] = ensemble(embeddings[[row[p] for p in label]])
        if visuals:
            pixels = self.preprocess([label.pixels for _, label in visuals])
            embeddings = self.loaded.model.get_conditional_embeddings(
                batch_size=len(visuals), conditional_pixel_values=pixels)
            for (i, _), emb in zip(visuals, embeddings, strict=True):
                out[i] = emb.to(self.dtype)
        return torch.stack([e for e in out if e is not None])

    # ---- public -----------------------------------------------------------------------------
    @torch.inference_mode()
    def batch_logits(self, images: Sequence[np.ndarray],
                     labels: Sequence[list[str]] | Sequence[list[LabelKey]]) -> list[torch.Tensor]:
        """Per image, (P_i, h, w) float32 logits on the device; one vision pass for the batch."""
        return self.logits_from_pixels(self.preprocess(images), labels)

    @torch.inference_mode()
    def logits_from_pixels(self, pixels: torch.Tensor, labels: Sequence[list[str]] | Sequence[list[LabelKey]],
                           activations: list[torch.Tensor] | None = None,
                           decoders: Sequence[Decoder | None] | None = None) -> list[torch.Tensor]:
        """The model part alone, from normalised (B, 3, S, S) pixel values. Per image, its labels:
        prompt strings, tuples of phrasings (ensembled), visual prompts or learned embeddings, and
        its decoder (`decoders`; None: the base's). The vision pass is one for the whole batch;
        only the decoder step is grouped by decoder."""
        pixels = pixels.to(self.loaded.device, self.dtype)
        if activations is None:
            activations = self.activations(pixels)
        counts = [len(p) for p in labels]
        # the decoder's logits come at the input's resolution; an image without labels gets none
        none = torch.zeros((0, *pixels.shape[-2:]), device=pixels.device)
        if sum(counts) == 0:  # embedding-only requests: no decoder pass
            return [none for _ in counts]
        flat = [label if isinstance(label, tuple | VisualPrompt | LearnedLabel | BoxPrompt) else (label,)
                for group in labels for label in group]
        with self._lock:
            conditional = self.text_cache.get_many(flat, self._label_embeddings).to(self.dtype)
        out: list[torch.Tensor] = []
        first = 0  # the first label of the chunk's first image
        for part in self._chunks(len(counts)):
            chunk = counts[part]
            size = sum(chunk)
            if size == 0:
                out += [none] * len(chunk)
                continue
            index = torch.repeat_interleave(torch.arange(len(chunk), device=pixels.device),
                                            torch.tensor(chunk, device=pixels.device))
            rows = conditional[first:first + size]
            wanted: list[Decoder | None] = [None] * len(chunk) if decoders is None else list(decoders[part])
            if all(d is None for d in wanted):
                logits = self._decoder_fn([a[part] for a in activations], rows, index)
            else:
                logits = self._decode_grouped([a[part] for a in activations], rows, index, wanted)
            out += list(torch.split(logits.float(), chunk))  # (labels, h, w): _decode keeps the label axis
            first += size
        return out

    def _decode_grouped(self, activations: list[torch.Tensor], conditional: torch.Tensor, index: torch.Tensor,
                        decoders: list[Decoder | None]) -> torch.Tensor:
        """The decoder step per distinct decoder among the images, scattered back into label order."""
        groups: dict[str | None, list[int]] = {}
        for image, decoder in enumerate(decoders):
            groups.setdefault(None if decoder is None else decoder.revision, []).append(image)
        by_revision = {d.revision: d for d in decoders if d is not None}
        logits: torch.Tensor | None = None
        for revision, images in groups.items():
            picked = torch.tensor(images, device=index.device)
            rows = torch.isin(index, picked).nonzero().squeeze(1)
            local = torch.searchsorted(picked, index.index_select(0, rows))  # image positions within the group
            module = None if revision is None else self.tuned_decoder(by_revision[revision])
            part = self._decode([a.index_select(0, picked) for a in activations], conditional.index_select(0, rows),
                                local, module)
            if logits is None:
                logits = part.new_empty((index.shape[0], *part.shape[1:]))
            logits[rows] = part
        assert logits is not None
        return logits

    @torch.inference_mode()
    def segment_batch(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        arrays = [r.image if isinstance(r.image, EncodedJpeg) and self.jpeg_decoder is not None
                  else as_uint8_array(r.image) for r in requests]
        pixels = self.preprocess(arrays)
        activations = self.activations(pixels)
        per_image = self.logits_from_pixels(pixels, [r.label_keys() for r in requests], activations,
                                            [r.decoder for r in requests])
        # embed: image continues the vision tower past the decoder's last layer, only for those asking
        wants_image = [i for i, r in enumerate(requests) if r.embed_image]
        image_vectors: dict[int, np.ndarray] = {}
        if wants_image:
            index = torch.tensor(wants_image, device=pixels.device)
            vectors = unit(self._finish_vision(activations[-1].index_select(0, index)))
            image_vectors = dict(zip(wants_image, vectors, strict=True))
        results = []
        for i, (req, arr, logits) in enumerate(zip(requests, arrays, per_image, strict=True)):
            width, height = req.output_size(arr)
            masks, label_map = upsample(logits, prompts=req.prompts, height=height, width=width,
                                        threshold=req.threshold, wanted=req.wanted,
                                        guide=refine_methods.request_guide(req, arr, self.loaded.device))
            results.append(SegmentResult(masks, logits.cpu(), label_map, image_vectors.get(i)))
        self._embed_masks(requests, arrays, results)
        return results

    def _embed_masks(self, requests: Sequence[SegmentRequest], arrays: list[np.ndarray | EncodedJpeg],
                     results: list[SegmentResult]) -> None:
        """embed: masks - every label's masked crop across the batch in one full-depth vision pass."""
        crops: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []
        for i, (req, arr, result) in enumerate(zip(requests, arrays, results, strict=True)):
            if not req.embed_masks:
                continue
            if isinstance(arr, EncodedJpeg):
                raise ValueError("mask embeddings need the decoded image, not an EncodedJpeg")
            result.mask_embeddings = [None] * len(result.masks)
            for j, mask in enumerate(result.masks):
                crop = masked_crop(arr, mask.mask, mask.bbox, self._grey)
                if crop is not None:
                    crops.append(crop)
                    owners.append((i, j))
        if not crops:
            return
        vectors = unit(self.image_features(self.preprocess(crops)))
        for (i, j), vector in zip(owners, vectors, strict=True):
            embeddings = results[i].mask_embeddings
            assert embeddings is not None
            embeddings[j] = vector

    @torch.inference_mode()
    def embed_queries(self, queries: Sequence[EmbedQuery]) -> list[np.ndarray]:
        """L2-normalised CLIP features of search queries: texts and images, each in one pass."""
        out: list[np.ndarray | None] = [None] * len(queries)
        texts = [(i, q.text) for i, q in enumerate(queries) if q.text is not None]
        images = [(i, q.image) for i, q in enumerate(queries) if q.image is not None]
        if texts:
            vectors = unit(self._text_embeddings([t for _, t in texts]))
            for (i, _), v in zip(texts, vectors, strict=True):
                out[i] = v
        if images:
            vectors = unit(self.image_features(self.preprocess([as_uint8_array(img) for _, img in images])))
            for (i, _), v in zip(images, vectors, strict=True):
                out[i] = v
        if any(v is None for v in out):
            raise ValueError("a query needs a text or an image")
        return [v for v in out if v is not None]

    def run_batch(self, items: Sequence[SegmentRequest | EmbedQuery]) -> list[SegmentResult | np.ndarray]:
        """What the batcher's thread calls: segmentations and search queries, in one batch."""
        out: list[SegmentResult | np.ndarray | None] = [None] * len(items)
        segs = [(i, r) for i, r in enumerate(items) if isinstance(r, SegmentRequest)]
        queries = [(i, q) for i, q in enumerate(items) if isinstance(q, EmbedQuery)]
        if segs:
            for (i, _), res in zip(segs, self.segment_batch([r for _, r in segs]), strict=True):
                out[i] = res
        if queries:
            for (i, _), vec in zip(queries, self.embed_queries([q for _, q in queries]), strict=True):
                out[i] = vec
        return [o for o in out if o is not None]

    def segment(self, image: Image.Image | np.ndarray, prompts: list[str], threshold: float) -> SegmentResult:
        return self.segment_batch([SegmentRequest(image, prompts, threshold)])[0]
