"""Fine-tuned CLIPSeg decoders: the folder `clipmask finetune` writes, read and applied to a base model.

The folder's format and its rules are shared/modelfile.py's (the uploader and the writer use the
same); this module loads the checked tensors into torch and applies the decoder to a loaded base.
CLIP itself is never changed, so one frozen backbone serves any number of such decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import modelfile
from shared.modelfile import LABEL_EMBEDDINGS


class InvalidModel(ValueError):
    """The folder or its files are not a fine-tuned model this code can apply; the message says why."""


@dataclass(frozen=True)
class ModelLabel:
    name: str
    prompts: list[str]
    threshold: float | None = None


@dataclass
class FineTuned:
    manifest: dict[str, Any]
    decoder: dict[str, torch.Tensor]  # "decoder.<name>" -> tensor
    label_embeddings: torch.Tensor | None

    @property
    def labels(self) -> list[ModelLabel]:
        return [ModelLabel(str(item["name"]), [str(p) for p in item["prompts"]], item.get("threshold"))
                for item in self.manifest["labels"]]

    @property
    def base_id(self) -> str:
        return str(self.manifest["base"]["id"])


def read_model_folder(path: str | Path) -> FineTuned:
    """The folder's manifest and tensors, checked by shared/modelfile.py's rules; InvalidModel says why not."""
    from safetensors.torch import load

    folder = Path(path)
    try:
        manifest, weights, _header = modelfile.read_folder(folder)
    except modelfile.InvalidModelFile as exc:
        raise InvalidModel(f"{folder}: {exc}") from exc
    tensors = load(weights)
    embeddings = tensors.pop(LABEL_EMBEDDINGS, None)
    return FineTuned(manifest.data, tensors, embeddings)


def decoder_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The base model's decoder tensors under the names a model folder uses."""
    return {f"decoder.{name}": tensor for name, tensor in model.decoder.state_dict().items()}


def check_against(model: Any, tuned: FineTuned) -> None:
    """InvalidModel unless the folder's decoder tensors are exactly the base decoder's names and shapes
    (and the label embeddings its projection size): shared/modelfile.py's rule, as the uploader checks it."""
    header = {name: {"shape": list(t.shape)} for name, t in tuned.decoder.items()}
    if tuned.label_embeddings is not None:
        header[LABEL_EMBEDDINGS] = {"shape": list(tuned.label_embeddings.shape)}
    decoder = {name: list(t.shape) for name, t in decoder_tensors(model).items()}
    try:
        modelfile.check_against_base(header, len(tuned.manifest["labels"]), decoder=decoder,
                                     projection_dim=int(model.config.projection_dim), base_id=tuned.base_id)
    except modelfile.InvalidModelFile as exc:
        raise InvalidModel(str(exc)) from exc


def apply_decoder(model: Any, tuned: FineTuned) -> None:
    """Load the folder's decoder into `model` in place (after check_against)."""
    check_against(model, tuned)
    state = {name.removeprefix("decoder."): tensor for name, tensor in tuned.decoder.items()}
    model.decoder.load_state_dict(state, strict=True)
