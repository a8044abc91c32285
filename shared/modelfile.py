"""The model folder `clipmask finetune` writes: its names and its one rule set, torch-free.

A folder holds `clipmask-model.json` (format version, base model id and revision, labels with their
phrasings and calibrated thresholds, training settings, validation metrics) and
`decoder.safetensors`: the decoder's tensors under their `decoder.` names in
CLIPSegForImageSegmentation and, when the labels' embeddings were trained too, `label_embeddings`
(labels x projection size). The uploader (`POST /v1/models`, shared/tuned_models.py), the loader (a
folder given to `clipmask eval` or the engine, worker/engine/finetuned.py) and the writer
(`clipmask finetune`, evaluation/finetune/output.py) all check a folder with the functions here, so what
one accepts the others accept (tests/shared/test_modelfile.py holds them to it).

The checks read the safetensors header and the raw bytes (numpy), never torch: the API can run them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "clipmask-model.json"
WEIGHTS = "decoder.safetensors"
LABEL_EMBEDDINGS = "label_embeddings"
MAX_LABELS = 32
MAX_PROMPTS = 8
MAX_TEXT = 200
MAX_MANIFEST_BYTES = 1 << 20
# A decoder declares tens of tensors: its header is a few KB. A header of megabytes costs an API
# thread many times its size in memory and seconds of CPU to parse (bench/README.md).
MAX_HEADER_BYTES = 256 << 10
# The float dtypes a CLIPSeg decoder's weights come in (the base's are F32; half precision loads into
# it too). Anything else (integers, 8-bit floats, a name safetensors doesn't know) is refused: the
# loader's load_state_dict would fail or quietly cast.
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# the exponent bits of each dtype, as the unsigned integer of the same width: all ones is NaN or infinity
_EXPONENT = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}
# Postgres stores neither NUL in text/jsonb nor lone UTF-16 surrogates
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class InvalidModelFile(ValueError):
    """What is wrong with a model folder's `part` ("manifest" or "weights"), in a sentence."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part


def _manifest_error(message: str) -> InvalidModelFile:
    return InvalidModelFile("manifest", message)


def _weights_error(message: str) -> InvalidModelFile:
    return InvalidModelFile("weights", message)


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]  # the whole manifest as written
    labels: list[dict[str, Any]]  # [{"name", "prompts", "threshold"?}], checked and normalised

    @property
    def base_id(self) -> str:
        return str(self.data["base"]["id"])

    @property
    def base_revision(self) -> str | None:
        revision = self.data["base"].get("revision")
        return None if revision is None else str(revision)


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: bytes | str) -> Any:
    """JSON as the standard has it: NaN, Infinity and numbers past a double's range (1e400) are refused
    (Python's json takes them; Postgres' jsonb refuses them, which made a create answer 500)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_number)


def _storable(value: Any) -> bool:
    if isinstance(value, str):
        return not UNSTORABLE.search(value)
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def parse_manifest(data: bytes) -> Manifest:
    """The manifest, or InvalidModelFile("manifest", why): at most 1 MiB of strict JSON, format 1,
    storable text, a base id, 1 to 32 labels each with a name, 1 to 8 phrasings and an optional
    threshold in (0, 1)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _manifest_error(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = strict_json(data)
    except (ValueError, RecursionError) as exc:
        raise _manifest_error(f"not JSON (upload the folder's {MANIFEST}): {exc}"[:300]) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise _manifest_error(f"format {found!r} is not {FORMAT_VERSION}")
    if not _storable(manifest):
        raise _manifest_error("holds a NUL character or a lone surrogate")
    base = manifest.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("id"), str) or not base["id"]:
        raise _manifest_error("no base model id")
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS:
        raise _manifest_error(f"labels must be a list of 1 to {MAX_LABELS} {{name, prompts}}")
    clean = []
    for i, label in enumerate(labels):
        ok = (isinstance(label, dict) and isinstance(label.get("name"), str) and 0 < len(label["name"]) <= MAX_TEXT
              and isinstance(label.get("prompts"), list) and 1 <= len(label["prompts"]) <= MAX_PROMPTS
              and all(isinstance(p, str) and 0 < len(p) <= MAX_TEXT for p in label["prompts"]))
        threshold = label.get("threshold") if isinstance(label, dict) else None
        if not ok or (threshold is not None and not (
                isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 < threshold < 1)):
            raise _manifest_error(f"labels[{i}] must be {{name, prompts: 1 to {MAX_PROMPTS} strings, threshold?}}")
        clean.append({"name": label["name"], "prompts": list(label["prompts"]),
                      **({"threshold": float(threshold)} if threshold is not None else {})})
    return Manifest(manifest, clean)


def check_weights(data: bytes) -> dict[str, Any]:
    """The tensors a safetensors file declares ({name: {"dtype", "shape", "data_offsets"}}), checked as
    the loader reads them: a bounded header, known float dtypes, each tensor's byte span exactly its
    shape times its dtype's size, spans back to back without overlap or gap up to the end of the file,
    and every value finite. InvalidModelFile("weights", why) for anything else."""
    if len(data) < 8:
        raise _weights_error("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise _weights_error("not a safetensors file (its header length runs past the file)")
    if size > MAX_HEADER_BYTES:
        raise _weights_error(f"the header is {size} bytes; a decoder's is under {MAX_HEADER_BYTES}")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError) as exc:
        raise _weights_error("not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise _weights_error("not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and all(type(n) is int and n >= 0 for n in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(type(n) is int and n >= 0 for n in info["data_offsets"])):
            raise _weights_error(f"tensor {name!r} is not described as safetensors describes tensors")
        dtype = info.get("dtype")
        if dtype not in DTYPE_BYTES:
            raise _weights_error(f"tensor {name!r} has dtype {str(dtype)[:20]!r}; a decoder's are one of "
                                 f"{', '.join(DTYPE_BYTES)}")
        start, end = info["data_offsets"]
        need = math.prod(info["shape"]) * DTYPE_BYTES[dtype]
        if end - start != need:
            raise _weights_error(f"tensor {name!r} spans {end - start} bytes, its shape {info['shape']} of {dtype} "
                                 f"needs {need}")
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise _weights_error(f"tensor {name!r} " + ("overlaps another" if start < at else "leaves a gap before it"))
        at = end
    if 8 + size + at != len(data):
        raise _weights_error("the file's length does not match its tensors (truncated or padded)")
    body = memoryview(data)[8 + size:]
    for start, end, name in spans:
        kind, exponent = _EXPONENT[header[name]["dtype"]]
        values = np.frombuffer(body[start:end], dtype=kind)
        if np.any((values & kind(exponent)) == kind(exponent)):
            raise _weights_error(f"tensor {name!r} holds NaN or infinity")
    return header


def check_against_base(header: dict[str, Any], labels: int, *, decoder: dict[str, list[int]], projection_dim: int,
                       base_id: str) -> bool:
    """InvalidModelFile("weights", why) unless the tensors are exactly the base decoder's names and
    shapes, and label embeddings (if any) are labels x the base's projection size. Returns whether the
    file holds label embeddings."""
    tensors = {name: info for name, info in header.items() if name != LABEL_EMBEDDINGS}
    want = {name: list(shape) for name, shape in decoder.items()}
    got = {name: list(info["shape"]) for name, info in tensors.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise _weights_error(f"the tensors are not {base_id}'s decoder (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in want.items():
        if got[name] != shape:
            raise _weights_error(f"{name} is {got[name]}, {base_id}'s decoder has {shape}")
    embeddings = header.get(LABEL_EMBEDDINGS)
    if embeddings is not None and list(embeddings["shape"]) != [labels, projection_dim]:
        raise _weights_error(f"{LABEL_EMBEDDINGS} are {embeddings['shape']}, expected {[labels, projection_dim]}")
    return embeddings is not None


def read_folder(path: str | Path) -> tuple[Manifest, bytes, dict[str, Any]]:
    """A folder's checked manifest, its weights file's bytes and their header; InvalidModelFile for a
    folder that is not a model (a file missing, or any rule above broken)."""
    folder = Path(path)
    try:
        manifest_bytes = (folder / MANIFEST).read_bytes()
        weights = (folder / WEIGHTS).read_bytes()
    except OSError as exc:
        raise InvalidModelFile("manifest" if not (folder / MANIFEST).is_file() else "weights",
                               f"cannot read {exc.filename}: {exc.strerror}") from exc
    manifest = parse_manifest(manifest_bytes)
    header = check_weights(weights)
    embeddings = header.get(LABEL_EMBEDDINGS)
    if embeddings is not None and (not embeddings["shape"] or embeddings["shape"][0] != len(manifest.labels)):
        raise _weights_error(f"{embeddings['shape'][:1]} label embeddings for {len(manifest.labels)} labels")
    return manifest, weights, header


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
