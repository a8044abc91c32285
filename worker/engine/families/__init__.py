"""Model families behind one Segmenter (worker/engine/__init__.py): which family a checkpoint is.

- clipseg: CLIPSeg (CIDAS/clipseg-rd64-refined); its engine is worker/engine/fast.py (and stock.py),
  loaded by worker/engine/loading.py.
- sam3: SAM 3 (facebook/sam3), worker/engine/families/sam3.py.
What each family lets a job ask for is shared/families.py's (the API checks jobs against it).
"""

from __future__ import annotations

import json
from pathlib import Path

# config.json model_type -> family
MODEL_TYPES = {"clipseg": "clipseg", "sam3": "sam3", "sam3_video": "sam3"}


def family_of(source: str) -> str:
    """The family of a checkpoint (hub id or folder), from its config.json's model_type."""
    from transformers.utils import cached_file

    path = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        raise FileNotFoundError(f"{source}: no config.json")
    model_type = json.loads(Path(path).read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not a family clipmask serves ({sorted(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]
