"""Soft masks for a batch of images: from the engine in this process, or from a running deployment.

Both give, per image, a (C, H, W) uint8 array of round(255 * p) in the order of the labels asked
for, at the image's size: what the service's `soft` output holds.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Label:
    name: str
    phrasings: list[str]


class Predictor(Protocol):
    description: str
    seconds: float  # time spent predicting (model or API), for images/s

    def predict(self, images: Sequence[Image.Image]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class EnginePredictor:
    """The worker's fast engine, loaded here (no stack needed) as a worker with the same settings
    loads it: `dtype` on CUDA, `cpu_dtype` on the CPU (auto: bf16 where the CPU multiplies bf16 in
    hardware), so "in process" is what the deployment runs."""

    def __init__(self, model: str, labels: list[Label], *, device: str = "auto", dtype: str = "bf16",
                 cpu_dtype: str = "auto", threshold: float = 0.4, refine: str = "none",
                 matting_max_pixels: int = 4_000_000) -> None:
        from shared.modelfile import is_model_folder
        from worker.engine import FastEngine, SegmentRequest, Wanted, load_clipseg
        from worker.engine.finetuned import apply_decoder, read_model_folder
        from worker.engine.types import LearnedLabel

        self._request, self._wanted = SegmentRequest, Wanted(soft=True)
        tuned = read_model_folder(model) if is_model_folder(model) else None
        base = tuned.base_id if tuned is not None else model
        self.loaded = load_clipseg(base, device=device, dtype=dtype, cpu_dtype=cpu_dtype)
        self.engine = FastEngine(self.loaded)
        what = model
        # the folder's own labels (by name and phrasings) answered with their learned embeddings, as
        # the worker answers a model's labels (worker/runner.py)
        self._learned: dict[tuple[str, tuple[str, ...]], LearnedLabel] = {}
        if tuned is not None:  # a fine-tuned folder: its decoder on the frozen base, its learned labels
            apply_decoder(self.loaded.model, tuned)
            self.loaded.model.decoder.to(self.loaded.device, self.loaded.dtype)
            if tuned.label_embeddings is not None:
                for index, (label, embedding) in enumerate(zip(tuned.labels, tuned.label_embeddings, strict=True)):
                    self._learned[(label.name, tuple(label.prompts))] = LearnedLabel(f"{model}:{index}", embedding)
            what = f"{model} (fine-tuned on {base})"
        self.labels = labels
        self.threshold = threshold
        self.refine, self.matting_max_pixels = refine, matting_max_pixels
        dtype_name = str(self.loaded.dtype).removeprefix("torch.")
        self.description = f"{what} in process on {self.loaded.device} ({dtype_name})" + (
            f", refine {refine}" if refine != "none" else "")
        self.seconds = 0.0

    def predict(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        names = [label.name for label in self.labels]
        phrasings: list[Any] = [self._learned.get((label.name, tuple(label.phrasings)), tuple(label.phrasings))
                                for label in self.labels]
        requests = [self._request(image, names, self.threshold, phrasings=phrasings, wanted=self._wanted,
                                  refine=self.refine) for image in images]
        started = time.perf_counter()
        results = self.engine.segment_batch(requests)
        if self.refine == "matting":  # as the worker does after the engine (worker/runner.py)
            from worker.engine.refine import apply_mattes

            for image, result in zip(images, results, strict=True):
                apply_mattes(np.asarray(image), result.masks, max_pixels=self.matting_max_pixels)
        self.seconds += time.perf_counter() - started
        out = []
        for image, result in zip(images, results, strict=True):
            soft = [m.soft for m in result.masks]
            out.append(np.stack(soft) if soft and all(s is not None for s in soft)  # type: ignore[arg-type]
                       else np.zeros((0, image.height, image.width), dtype=np.uint8))
        return out

    def close(self) -> None:
        pass


class ApiPredictor:
    """A running deployment through the public API: one job per image (`outputs: ["soft"]`,
    `Prefer: wait`), `parallel` in flight, the soft masks downloaded from their URLs."""

    def __init__(self, base_url: str, api_key: str, *, preset: str | None, prompts: list[str],
                 labels: list[Label], threshold: float = 0.4, parallel: int = 8, model: str | None = None,
                 refine: str = "none") -> None:
        from client import Clipmask

        self.client = Clipmask(base_url, api_key)
        self.preset, self.prompts, self.labels, self.threshold = preset, prompts, labels, threshold
        self.model, self.refine = model, refine
        self.pool = ThreadPoolExecutor(max_workers=parallel)
        self.description = f"the deployment at {base_url}" + (f" (model {model})" if model else "") + (
            f", refine {refine}" if refine != "none" else "")
        self.seconds = 0.0

    def _one(self, image: Image.Image) -> np.ndarray:
        from client import ClipmaskError

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        job = self.client.create_job(buf.getvalue(), self.prompts or None, preset=self.preset, outputs=["soft"],
                                     threshold=self.threshold, wait=60, model=self.model,
                                     refine=None if self.refine == "none" else self.refine)
        if job.status not in ("succeeded", "failed", "canceled"):
            job = self.client.wait(job.id, timeout=600)
        if job.status != "succeeded":
            raise ClipmaskError(0, "job_failed", f"job {job.id} ended {job.status}: {job.error}")
        by_name = {r.prompt: r for r in job.results}
        planes = []
        for label in self.labels:
            url = by_name[label.name].soft_url
            assert url is not None, "the job was asked for soft masks"
            with Image.open(io.BytesIO(self.client.fetch(url))) as soft:
                planes.append(np.asarray(soft.convert("L"), dtype=np.uint8))
        return np.stack(planes) if planes else np.zeros((0, image.height, image.width), dtype=np.uint8)

    def predict(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        started = time.perf_counter()
        out = list(self.pool.map(self._one, images))
        self.seconds += time.perf_counter() - started
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
