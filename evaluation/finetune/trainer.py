"""The decoder's training loop: the frozen backbone's activations cached once per variant, a step
of BCE plus Dice per label on the decoder alone, and validation mIoU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from evaluation.datasets import IGNORE
from evaluation.scoring import Scores

DEFAULT_THRESHOLD = 0.4


@dataclass
class Settings:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    lr_min: float = 1e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    variants: int = 4
    patience: int = 5
    prompt_tuning: bool = False
    threshold: float = DEFAULT_THRESHOLD
    device: str = "cpu"


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    val_miou: list[float | None] = field(default_factory=list)
    best_epoch: int = 0
    stopped: str = "ran every epoch"


class Trainer:
    """The decoder of a loaded base model, trained on cached activations."""

    def __init__(self, base: str, labels: list[Any], settings: Settings) -> None:
        import torch

        from worker.engine import FastEngine, load_clipseg
        from worker.engine.embed import ensemble

        self.torch = torch
        self.settings = settings
        self.loaded = load_clipseg(base, device=settings.device, dtype="fp32", cpu_dtype="fp32")
        self.model = self.loaded.model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.engine = FastEngine(self.loaded, text_cache_size=0)
        self.labels = labels
        with torch.no_grad():
            phrases = list(dict.fromkeys(p for label in labels for p in label.phrasings))
            embedded = self.engine._text_embeddings(phrases).float()
            row = {p: i for i, p in enumerate(phrases)}
            self.text_embeddings = torch.stack([ensemble(embedded[[row[p] for p in label.phrasings]])
                                                for label in labels])
        self.label_embeddings = torch.nn.Parameter(self.text_embeddings.clone(), requires_grad=settings.prompt_tuning)
        self.decoder = self.model.decoder
        for param in self.decoder.parameters():
            param.requires_grad_(True)
        pre = self.loaded.preprocessing
        self.input_size = (pre.width, pre.height)
        hidden = self.model.config.vision_config.hidden_size
        self.cache_dtype = torch.bfloat16 if hidden >= 512 else torch.float32

    # ---- the frozen part, once ------------------------------------------------------------------
    def activations(self, image: Image.Image) -> list[Any]:
        torch = self.torch
        with torch.no_grad():
            pixels = self.engine.preprocess([np.asarray(image.convert("RGB"))])
            return [a.to("cpu", self.cache_dtype) for a in self.engine.activations(pixels)]

    def output_size(self) -> tuple[int, int]:
        torch = self.torch
        with torch.no_grad():
            probe = self.activations(Image.new("RGB", self.input_size))
            logits = self.decode(probe, [0], self.label_embeddings[:1])
        return int(logits.shape[-1]), int(logits.shape[-2])

    def decode(self, cached: list[Any], images: list[int] | None = None, conditional: Any = None) -> Any:
        """Logits (images x labels, h, w) for cached activations (a list per layer, batch first)."""
        torch = self.torch
        conditional = self.label_embeddings if conditional is None else conditional
        acts = [a.to(self.loaded.device, torch.float32) for a in cached]
        batch = acts[0].shape[0]
        labels = conditional.shape[0]
        index = torch.arange(batch, device=self.loaded.device).repeat_interleave(labels)
        cond = conditional.to(self.loaded.device).repeat(batch, 1)
        return self.engine._decode(acts, cond, index)

    # ---- the loss -------------------------------------------------------------------------------
    def loss(self, logits: Any, targets: Any, valid: Any) -> Any:
        """BCE over valid pixels plus soft Dice per label, averaged."""
        torch = self.torch
        F = torch.nn.functional
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        bce = (bce * valid).sum() / valid.sum().clamp(min=1)
        probs = torch.sigmoid(logits) * valid
        inter = (probs * targets).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (probs.sum(dim=(1, 2)) + (targets * valid).sum(dim=(1, 2)) + 1)
        return bce + dice.mean()


def _targets(truths: list[np.ndarray], labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(images x labels, h, w) float targets and validity for truths of label indices."""
    stacked = np.stack(truths)
    targets = (stacked[:, None] == np.arange(1, labels + 1)[None, :, None, None]).astype(np.float32)
    valid = np.repeat((stacked != IGNORE)[:, None], labels, axis=1).astype(np.float32)
    return targets.reshape(-1, *stacked.shape[1:]), valid.reshape(-1, *stacked.shape[1:])


def _soft(trainer: Trainer, cached: list[Any], size: tuple[int, int]) -> np.ndarray:
    """(labels, H, W) uint8 round(255 p) at the image's size, as the service's `soft` gives it."""
    torch = trainer.torch
    with torch.no_grad():
        logits = trainer.decode(cached)
        up = torch.nn.functional.interpolate(logits[None].float(), size=(size[1], size[0]), mode="bilinear",
                                             align_corners=False)[0]
        return torch.sigmoid(up).mul(255).round().to(torch.uint8).cpu().numpy()


def validate(trainer: Trainer, val: list[tuple[str, list[Any], np.ndarray, Image.Image]],
             threshold: float) -> Scores:
    scores = Scores([label.name for label in trainer.labels], threshold)
    for name, cached, truth, image in val:
        scores.add(name, truth, _soft(trainer, cached, (truth.shape[1], truth.shape[0])), image)
    return scores
