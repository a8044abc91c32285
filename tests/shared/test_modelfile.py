"""One rule set for the model folder (shared/modelfile.py): the uploader (POST /v1/models'
check_upload), the loader (worker/engine/finetuned.py, which the writer `clipmask finetune` runs on
what it wrote) accept and refuse the same folders, for the same part (manifest or weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared.db import session_scope
from shared.modelfile import MANIFEST, WEIGHTS
from shared.tuned_models import InvalidManifest, InvalidWeights, ModelError, check_upload, record_base
from worker.engine import load_clipseg
from worker.engine.finetuned import InvalidModel, check_against, decoder_tensors, read_model_folder


@pytest.fixture(scope="module")
def base(settings, tiny_model_dir):
    return load_clipseg(str(tiny_model_dir), device="cpu").model


def write(folder: Path, manifest: dict | bytes, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    return folder


def folders(root: Path, base, base_id: str) -> dict[str, tuple[Path, str | None]]:
    """Folders by name, with the part a refusal must name (None: a valid model)."""
    tensors = {k: v.detach().clone() for k, v in decoder_tensors(base).items()}
    dim = int(base.config.projection_dim)
    labels = [{"name": "top", "prompts": ["a top"], "threshold": 0.4}, {"name": "skirt", "prompts": ["a skirt"]}]
    manifest = {"format": 1, "base": {"id": base_id}, "labels": labels, "metrics": {"miou": 0.5}}
    name = next(k for k in tensors if tensors[k].dim() == 2)
    nan = {**tensors, name: tensors[name].clone().fill_(float("nan"))}
    cases: dict[str, tuple[dict | bytes, dict[str, torch.Tensor], str | None]] = {
        "valid": (manifest, tensors, None),
        "valid with label embeddings": (manifest, {**tensors, "label_embeddings": torch.randn(2, dim)}, None),
        "valid in half precision": (manifest, {k: v.half() for k, v in tensors.items()}, None),
        "format 2": ({**manifest, "format": 2}, tensors, "manifest"),
        "33 labels": ({**manifest, "labels": [{"name": f"l{i}", "prompts": ["x"]} for i in range(33)]}, tensors,
                      "manifest"),
        "a threshold of 1.5": ({**manifest, "labels": [{"name": "a", "prompts": ["x"], "threshold": 1.5}]}, tensors,
                               "manifest"),
        "nine phrasings": ({**manifest, "labels": [{"name": "a", "prompts": ["x"] * 9}]}, tensors, "manifest"),
        "a NaN metric": (json.dumps(manifest).replace("0.5", "NaN").encode(), tensors, "manifest"),
        "no base": ({**manifest, "base": {}}, tensors, "manifest"),
        "a NaN weight": (manifest, nan, "weights"),
        "an integer tensor": (manifest, {**tensors, name: tensors[name].to(torch.int32)}, "weights"),
        "a missing tensor": (manifest, {k: v for k, v in tensors.items() if k != name}, "weights"),
        "a wrong shape": (manifest, {**tensors, name: torch.zeros(3, 3)}, "weights"),
        "embeddings for 3 labels": (manifest, {**tensors, "label_embeddings": torch.randn(3, dim)}, "weights"),
    }
    return {case: (write(root / case.replace(" ", "-"), m, t), part) for case, (m, t, part) in cases.items()}


def test_the_uploader_and_the_loader_accept_and_refuse_the_same_folders(settings, sessions, base, tiny_model_dir,
                                                                        tmp_path):
    base_id = f"modelfile-base-{tmp_path.name}"
    with session_scope(sessions) as session:
        record_base(session, model_id=base_id, revision=None, projection_dim=int(base.config.projection_dim),
                    decoder={k: list(v.shape) for k, v in decoder_tensors(base).items()})
    refused_as = {InvalidManifest: "manifest", InvalidWeights: "weights"}
    for case, (folder, part) in folders(tmp_path, base, base_id).items():
        try:
            with sessions() as session:
                check_upload(session, (folder / MANIFEST).read_bytes(), (folder / WEIGHTS).read_bytes())
            uploader = None
        except ModelError as exc:
            uploader = refused_as.get(type(exc), type(exc).__name__)
        try:
            check_against(base, read_model_folder(folder))
            loader = None
        except InvalidModel as exc:
            loader = "manifest" if f"{MANIFEST}" in str(exc) or "manifest:" in str(exc) else "weights"
        assert (uploader, loader) == (part, part), case
