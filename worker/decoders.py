"""Fine-tuned decoders a worker serves, loaded from object storage on first use and kept by revision.

A job that names a tenant's model carries the revision it was created with (`jobs.model_ref`). Each
run checks that the tenant still has that model at that revision (a deleted or replaced model fails
the job with `model_not_found`), then takes the weights from here: the last `capacity` revisions
used, at most `max_bytes` of tensors, least recently used evicted first. The engine keeps its own
decoder modules per revision (worker/engine/fast.py), so weights are never mixed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import JobFailure
from shared.modelfile import LABEL_EMBEDDINGS
from shared.storage import ObjectStorage
from shared.tuned_models import find_model
from worker.engine.types import Decoder


class ModelNotFound(JobFailure):
    code = "model_not_found"


class BaseMismatch(JobFailure):
    code = "unsupported_base_model"


@dataclass(frozen=True)
class Served:
    decoder: Decoder
    label_embeddings: torch.Tensor | None
    load_seconds: float


class DecoderCache:
    def __init__(self, *, capacity: int = 16, max_bytes: int = 512 << 20) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self._items: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, ref: dict[str, Any], tenant_id: str, *, sessions: sessionmaker[Session],
            storage: ObjectStorage, on_load: Callable[[float], None] | None = None,
            base: tuple[str, str | None] | None = None) -> Served:
        """The model's decoder; ModelNotFound when it is gone, BaseMismatch when `base` (the id and
        revision this worker serves) is not the exact base it was made for: never run on another."""
        with sessions() as session:
            row = find_model(session, tenant_id, str(ref["id"]))
            key = None if row is None or row.revision != ref["revision"] else row.weights_key
        if key is None or row is None:
            raise ModelNotFound(f"model {ref['id']!r} (revision {ref['revision']}) was deleted or replaced after "
                                "this job was created")
        if base is not None and (row.base_id != base[0] or (row.base_revision and base[1]
                                                            and row.base_revision != base[1])):
            raise BaseMismatch(f"model {ref['id']!r} was made for {row.base_id} (revision {row.base_revision}); this "
                               f"worker serves {base[0]} (revision {base[1]}), and a model runs only on its own base")
        with self._lock:
            held = self._items.get(ref["revision"])
            if held is not None:
                self._items.move_to_end(ref["revision"])
                return held
        started = time.perf_counter()
        from safetensors.torch import load

        tensors = load(storage.get(key))
        embeddings = tensors.pop(LABEL_EMBEDDINGS, None)
        served = Served(Decoder(str(ref["revision"]), tensors), embeddings, time.perf_counter() - started)
        self.loads += 1
        if on_load is not None:
            on_load(served.load_seconds)
        with self._lock:
            self._items[served.decoder.revision] = served
            while self._items and (len(self._items) > self.capacity or sum(
                    s.decoder.nbytes for s in self._items.values()) > self.max_bytes):
                self._items.popitem(last=False)
        return served
