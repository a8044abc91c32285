"""The segmentation engine: one family per file in worker/engine/families (CLIPSeg, SAM 3), behind
one `Segmenter`. Imports torch, transformers, numpy and PIL only (no Celery, Flask, SQLAlchemy or
boto3), so it runs and benchmarks on its own, also on a GPU machine."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from worker.engine.batcher import DynamicBatcher
from worker.engine.embed import VisualPrompt
from worker.engine.families import family_of
from worker.engine.families.sam3 import Sam3Engine, load_sam3
from worker.engine.fast import FastEngine
from worker.engine.jpeg import EncodedJpeg, jpeg_decoder_for
from worker.engine.loading import LoadedModel, load_clipseg
from worker.engine.stock import StockEngine
from worker.engine.types import EmbedQuery, PromptMask, SegmentRequest, SegmentResult, Wanted

__all__ = [
    "EmbedQuery", "EncodedJpeg", "FastEngine", "LoadedModel", "PromptMask", "SegmentRequest", "SegmentResult",
    "Segmenter", "StockEngine", "VisualPrompt", "Wanted", "load_clipseg", "open_segmenter",
]


@dataclass
class Segmenter:
    """What the job runner calls: thread-safe `run(SegmentRequest)` (or `segment(image, prompts,
    threshold)`), and `embed(EmbedQuery)` for search queries."""

    loaded: LoadedModel
    kind: str
    batcher: DynamicBatcher[Any, Any] | None
    stock: StockEngine | None
    engine: Any = None  # the family's engine: FastEngine (CLIPSeg), Sam3Engine
    family: str = "clipseg"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_revision(self) -> str | None:
        return self.loaded.revision

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the model sees; an image decoded at least this large loses nothing."""
        return self.loaded.preprocessing.width, self.loaded.preprocessing.height

    @property
    def decodes_jpeg(self) -> str | None:
        """The name of the decoder that takes requests' JPEGs undecoded (EncodedJpeg) and decodes
        them with their batch on the device ("nvjpeg", or "pillow" where forced on); None: send
        decoded images."""
        decoder = None if self.engine is None else self.engine.jpeg_decoder
        return None if decoder is None else decoder.name

    def run(self, request: SegmentRequest) -> SegmentResult:
        if self.batcher is not None:
            return self.batcher(request)
        assert self.stock is not None
        with self._lock:  # one forward at a time on the device, like the fast path's single thread
            return self.stock.run(request)

    def embed(self, query: EmbedQuery) -> np.ndarray:
        """The L2-normalised CLIP embedding of a search query (text or image), on the inference
        thread like every other use of the device."""
        if self.batcher is not None:
            vector: np.ndarray = self.batcher(query)
            return vector
        assert self.stock is not None
        with self._lock:
            return self.stock.embed_query(query)

    @property
    def model_id(self) -> str:
        return self.loaded.source

    def segment(self, image: Image.Image, prompts: list[str], threshold: float) -> SegmentResult:
        return self.run(SegmentRequest(image, prompts, threshold))

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def open_segmenter(
    model: str, *, device: str = "auto", dtype: str = "bf16", cpu_dtype: str = "fp32", kind: str = "fast",
    max_batch_images: int = 16,
    max_batch_wait_ms: float = 5.0, text_cache_size: int = 4096, torch_compile: bool = False,
    on_batch: Callable[[int], None] | None = None, device_decode: str = "auto",
) -> Segmenter:
    """Load the model once (its family read from its config) and start the inference thread
    (kind="fast") in the calling process. `device_decode`: auto | on | off, whether JPEGs are decoded
    on the device (worker/engine/jpeg.py; CLIPSeg)."""
    if family_of(model) == "sam3":
        loaded = load_sam3(model, device=device, dtype=dtype, cpu_dtype=cpu_dtype)
        sam3 = Sam3Engine(loaded, text_cache_size=text_cache_size)
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(sam3.run_batch, max_batch=max_batch_images,
                                                           max_wait_ms=max_batch_wait_ms, on_batch=on_batch)
        return Segmenter(loaded, "fast", batcher, None, sam3, family="sam3")
    loaded = load_clipseg(model, device=device, dtype=dtype, cpu_dtype=cpu_dtype)
    if kind == "stock":
        return Segmenter(loaded, kind, None, StockEngine(loaded))
    engine = FastEngine(loaded, text_cache_size=text_cache_size, compile=torch_compile,
                        jpeg_decoder=jpeg_decoder_for(device_decode, loaded.device))
    batcher = DynamicBatcher(engine.run_batch, max_batch=max_batch_images, max_wait_ms=max_batch_wait_ms,
                             on_batch=on_batch)
    return Segmenter(loaded, kind, batcher, None, engine)
