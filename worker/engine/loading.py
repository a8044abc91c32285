"""Loading a CLIPSeg checkpoint (hub id or local directory) and reading its preprocessing."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pil_image_processor_class() -> Any:
    """ViT's PIL-based image processor (transformers 5 names it ViTImageProcessorPil; before, the
    plain ViTImageProcessor was PIL-based). The torchvision one would need torchvision."""
    try:
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil
    except ImportError:
        from transformers import ViTImageProcessor

        return ViTImageProcessor


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so oneDNN's bf16 kernels
    beat fp32; elsewhere bf16 is emulated and slower (AVX2 only: measured in bench/README.md)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_cpu_dtype(cpu_dtype: str) -> torch.dtype:
    """CLIPMASK_CPU_DTYPE: "auto" is bf16 where the CPU has it natively, else fp32."""
    if cpu_dtype == "auto":
        return torch.bfloat16 if native_cpu_bf16() else torch.float32
    return DTYPES[cpu_dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CLIPMASK_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


@dataclass(frozen=True)
class Preprocessing:
    """What the checkpoint's processor does to an image, read from its own files."""

    height: int
    width: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class LoadedModel:
    model: Any  # CLIPSegForImageSegmentation
    processor: Any  # CLIPSegProcessor
    tokenizer: Any
    preprocessing: Preprocessing
    device: torch.device
    dtype: torch.dtype
    source: str
    revision: str | None = None  # the hub commit, or sha256 of a local folder's weights


def checkpoint_revision(source: str, model: Any) -> str | None:
    """What exactly ran: for a local folder, "sha256:" + the digest of its weight files (in name
    order); for a hub id, the commit transformers resolved (config._commit_hash)."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            return None
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()
    commit = getattr(model.config, "_commit_hash", None)
    return str(commit) if commit else None


def read_preprocessing(image_processor: Any) -> Preprocessing:
    size = image_processor.size
    if isinstance(size, dict):
        height = size.get("height") or size.get("shortest_edge")
        width = size.get("width") or size.get("shortest_edge")
    else:
        height = width = getattr(size, "height", None) or int(size)
    rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
    mean = image_processor.image_mean if image_processor.do_normalize else [0.0, 0.0, 0.0]
    std = image_processor.image_std if image_processor.do_normalize else [1.0, 1.0, 1.0]
    return Preprocessing(int(height), int(width), float(rescale), tuple(mean), tuple(std))  # type: ignore[arg-type]


def load_processor(source: str) -> Any:
    """The checkpoint's CLIPSegProcessor, with the PIL image backend (no torchvision needed)."""
    from transformers import CLIPSegProcessor, CLIPTokenizer

    image_processor = pil_image_processor_class().from_pretrained(source)
    tokenizer = CLIPTokenizer.from_pretrained(source)
    return CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_clipseg(source: str, *, device: str = "auto", dtype: str = "bf16", cpu_dtype: str = "fp32") -> LoadedModel:
    """Load weights once (hub id like CIDAS/clipseg-rd64-refined, or a directory): `dtype` on
    CUDA, `cpu_dtype` on the CPU (fp32, bf16 or auto: see resolve_cpu_dtype)."""
    from transformers import CLIPSegForImageSegmentation

    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype] if dev.type == "cuda" else resolve_cpu_dtype(cpu_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):
        model = CLIPSegForImageSegmentation.from_pretrained(source, **kwargs)
    model = model.to(dev).eval()  # type: ignore[arg-type]  # (transformers types .to() for dtypes only)
    processor = load_processor(source)
    # Prompts past the text model's positions (77 for CLIP) are truncated there, as CLIP's own
    # tokenize(truncate=True) does: the tokenizer's limit is the model's, whatever its files say.
    processor.tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    where = "directory" if Path(source).is_dir() else "hub"
    log.info("loaded CLIPSeg from %s %s on %s (%s)", where, source, dev, torch_dtype)
    return LoadedModel(model, processor, processor.tokenizer, read_preprocessing(processor.image_processor),
                       dev, torch_dtype, source, checkpoint_revision(source, model))
