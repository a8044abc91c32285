"""Fine-tuned CLIPSeg decoders: the folder `clipmask finetune` writes, read and applied to a base model.

A folder holds `clipmask-model.json` (format version, base model id and revision, labels with
their phrasings and calibrated thresholds, training settings, validation metrics) and
`decoder.safetensors`: the decoder's tensors under their `decoder.` names in
CLIPSegForImageSegmentation, and, when the labels' conditional embeddings were trained too,
`label_embeddings` (labels x projection dim). CLIP itself is never changed, so one frozen backbone
serves any number of such decoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST = "clipmask-model.json"
WEIGHTS = "decoder.safetensors"
LABEL_EMBEDDINGS = "label_embeddings"


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


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_model_folder(path: str | Path) -> FineTuned:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{folder / MANIFEST}: not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise InvalidModel(f"{folder / MANIFEST}: format {found!r} is not {FORMAT_VERSION}")
    if not isinstance(manifest.get("base"), dict) or not manifest["base"].get("id"):
        raise InvalidModel(f"{folder / MANIFEST}: no base model id")
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not labels or not all(
            isinstance(item, dict) and item.get("name") and item.get("prompts") for item in labels):
        raise InvalidModel(f"{folder / MANIFEST}: labels must be a non-empty list of {{name, prompts}}")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise InvalidModel(f"{folder / WEIGHTS}: not a readable safetensors file ({exc})") from exc
    embeddings = tensors.pop(LABEL_EMBEDDINGS, None)
    if embeddings is not None and embeddings.shape[0] != len(labels):
        raise InvalidModel(f"{folder / WEIGHTS}: {embeddings.shape[0]} label embeddings for {len(labels)} labels")
    return FineTuned(manifest, tensors, embeddings)


def decoder_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The base model's decoder tensors under the names a model folder uses."""
    return {f"decoder.{name}": tensor for name, tensor in model.decoder.state_dict().items()}


def check_against(model: Any, tuned: FineTuned) -> None:
    """InvalidModel unless the folder's decoder tensors are exactly the base decoder's names and shapes
    (and the label embeddings its projection size)."""
    want = {name: tuple(t.shape) for name, t in decoder_tensors(model).items()}
    got = {name: tuple(t.shape) for name, t in tuned.decoder.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise InvalidModel(f"decoder tensors differ from the base's: missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [name for name in want if want[name] != got[name]]
    if wrong:
        raise InvalidModel(f"decoder tensor {wrong[0]} is {got[wrong[0]]}, the base's is {want[wrong[0]]}")
    dim = int(model.config.projection_dim)
    if tuned.label_embeddings is not None and tuple(tuned.label_embeddings.shape[1:]) != (dim,):
        raise InvalidModel(f"label embeddings are {tuple(tuned.label_embeddings.shape)}, the base projects to {dim}")


def apply_decoder(model: Any, tuned: FineTuned) -> None:
    """Load the folder's decoder into `model` in place (after check_against)."""
    check_against(model, tuned)
    state = {name.removeprefix("decoder."): tensor for name, tensor in tuned.decoder.items()}
    model.decoder.load_state_dict(state, strict=True)
