"""A search query's embedding, computed by a worker for the API (the search RPC): a text's CLIP text
features, or an image's (fetched and decoded under a job image's rules)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from shared.errors import JobFailure
from shared.fetch import fetch_image_bytes
from shared.images import decode
from worker.deps import MODEL_INPUT, RunnerDeps
from worker.engine.types import EmbedQuery
from worker.outputs import vector_list

log = logging.getLogger(__name__)


def embed_query(query: dict[str, Any], deps: RunnerDeps, *, image: bytes | None = None) -> dict[str, Any]:
    """A search query's embedding as the API's RPC answer: {"vector", "model"}, or {"error": {code,
    message}} for an image that can't be fetched or decoded (same rules as a job's image). The
    query is {"text"}, {"image_url"}, or the `image` bytes the API staged."""
    try:
        if "text" in query:
            wanted = EmbedQuery(text=str(query["text"]))
        else:
            if image is not None:
                data = image
            else:
                data = fetch_image_bytes(str(query["image_url"]), deps.fetch_policy).data
            picture = decode(data, max_pixels=deps.max_pixels, at_least=MODEL_INPUT).image
            wanted = EmbedQuery(image=np.asarray(picture))
        segmenter = deps.segmenter()
        vector = segmenter.embed(wanted)  # type: ignore[attr-defined]
    except JobFailure as exc:
        return {"error": {"code": exc.code, "message": exc.message}}
    except Exception as exc:  # answered at once (the API says 503), never left to the API's timeout
        log.exception("search query not embedded")
        return {"error": {"code": "internal", "message": f"the worker failed: {type(exc).__name__}"}}
    return {"vector": vector_list(vector), "model": deps.model_id}
