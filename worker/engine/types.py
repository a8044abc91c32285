"""What goes into the engine and what comes out, for every engine (fast, stock) and every stage:
a request (`SegmentRequest`, `EmbedQuery`) and what its labels are conditioned on (`LabelKey`:
phrasings, an example image, a learned embedding; a fine-tuned `Decoder`), a label's mask and maps
(`PromptMask`), a request's result (`SegmentResult`) and what to bring back from the device
(`Wanted`). Their own module, so that no stage imports another for its types: postprocess.py makes
PromptMasks and refine.py mattes them in place without importing each other, and stock.py takes
requests without importing the fast engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from worker.engine.embed import VisualPrompt
from worker.engine.jpeg import EncodedJpeg


@dataclass
class Instance:
    """One instance a model found for a label (SAM 3): its own binary mask, score and tight box."""

    mask: np.ndarray  # (H, W) bool
    score: float
    bbox: list[int] | None  # [x0, y0, x1, y1], exclusive end


@dataclass
class PromptMask:
    prompt: str
    mask: np.ndarray  # (H, W) uint8, 0 or 255
    score: float  # highest probability anywhere in the image
    bbox: list[int] | None  # [x0, y0, x1, y1], exclusive end
    area_fraction: float
    soft: np.ndarray | None = None  # (H, W) uint8 round(255 * p), when asked for
    refine: str = "none"  # what made p: none (bilinear), guided; matting when its soft map is a matte
    # the model's own instances, best first, when asked for (SAM 3; CLIPSeg's come from the mask's components)
    instances: list[Instance] | None = None
    presence: float | None = None  # how sure the model is that the label appears at all (SAM 3)


@dataclass
class SegmentResult:
    masks: list[PromptMask]
    logits: torch.Tensor  # (P, h, w) float32 on CPU at the model's output resolution
    label_map: np.ndarray | None = None  # (H, W) uint8: 0 none, else 1 + index of the most probable label
    # L2-normalised CLIP image embeddings (float32), when asked for: the whole image, and per label
    # its masked crop (None for an empty mask)
    image_embedding: np.ndarray | None = None
    mask_embeddings: list[np.ndarray | None] | None = None


@dataclass(frozen=True)
class Wanted:
    """What to bring back from the device besides the binary masks."""

    soft: bool = False
    label_map: bool = False
    instances: bool = False  # the model's own instance masks (SAM 3)


Phrasings = tuple[str, ...]


@dataclass(frozen=True, eq=False)
class LearnedLabel:
    """A label whose conditional embedding was learned (`clipmask finetune --prompt-tuning`): equal
    and cached by `key` (the model's revision and the label's index)."""

    key: str
    embedding: torch.Tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LearnedLabel) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(frozen=True, eq=False)
class Decoder:
    """A fine-tuned decoder's tensors ("decoder.<name>", as worker/engine/finetuned.py reads them),
    run on the shared frozen backbone; known by `revision`, so an update never mixes weights."""

    revision: str
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class BoxPrompt:
    """Exemplar boxes (SAM 3): segment every instance like the positive boxes and unlike the
    negative ones, in the image's pixel coordinates [x0, y0, x1, y1]."""

    boxes: tuple[tuple[float, float, float, float], ...]
    negative_boxes: tuple[tuple[float, float, float, float], ...] = ()


# What a label is conditioned on: its text phrasings (ensembled), an example image, a learned
# embedding, or exemplar boxes.
LabelKey = Phrasings | VisualPrompt | LearnedLabel | BoxPrompt


@dataclass
class SegmentRequest:
    # RGB; an (H, W, 3) uint8 array is used as is; an EncodedJpeg is decoded with its batch on the
    # device (engine.jpeg_decoder), for requests that need no host pixels (no guide, no mask embeddings)
    image: Image.Image | np.ndarray | EncodedJpeg
    prompts: list[str]  # one name per label (a text prompt is its own name)
    threshold: float | Sequence[float]  # one for every label, or one per label
    # per label its phrasings, or a VisualPrompt; None: each prompt is its label's one phrasing
    phrasings: list[LabelKey] | None = None
    wanted: Wanted = Wanted()
    # (width, height) of the outputs; None: the image's own. A JPEG decoded at a reduced scale for
    # the model (shared.images.decode) still gets masks at the full picture's size.
    size: tuple[int, int] | None = None
    embed_image: bool = False  # the whole image's CLIP embedding
    embed_masks: bool = False  # each label's masked crop's CLIP embedding
    decoder: Decoder | None = None  # a fine-tuned decoder; None: the base model's
    # none: bilinear upsampling; guided (and matting, whose matte the caller makes from the guided
    # masks, refine.matte): the guided filter with the image as guide, at the output size
    refine: str = "none"

    def output_size(self, arr: np.ndarray | EncodedJpeg) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        return arr.size if isinstance(arr, EncodedJpeg) else (arr.shape[1], arr.shape[0])

    def label_keys(self) -> list[LabelKey]:
        if self.phrasings is None:
            return [(p,) for p in self.prompts]
        if len(self.phrasings) != len(self.prompts) or not all(
                isinstance(p, VisualPrompt | LearnedLabel | BoxPrompt) or len(p) for p in self.phrasings):
            raise ValueError("each label needs one or more phrasings")
        return [p if isinstance(p, VisualPrompt | LearnedLabel | BoxPrompt) else tuple(p) for p in self.phrasings]


@dataclass
class EmbedQuery:
    """A search query to embed: a text (CLIP text features) or an image (CLIP image features)."""

    text: str | None = None
    image: np.ndarray | None = None


def as_uint8_array(image: Image.Image | np.ndarray | EncodedJpeg) -> np.ndarray:
    if isinstance(image, EncodedJpeg):
        raise ValueError("an EncodedJpeg is decoded by the engine's jpeg_decoder, and this engine has none")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError("images must be RGB uint8 (H, W, 3)")
    return arr
