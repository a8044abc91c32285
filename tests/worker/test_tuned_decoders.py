"""Fine-tuned decoders served on one frozen backbone: a batch mixing decoders shares the vision
pass and gives each image what its own decoder gives alone (tiny model, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.support.engine import picture
from worker.engine import FastEngine, SegmentRequest, load_clipseg
from worker.engine.finetuned import decoder_tensors
from worker.engine.types import Decoder, LearnedLabel

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_clipseg(str(tiny_model_dir), device="cpu", cpu_dtype="fp32")


def perturbed(loaded, seed: int) -> Decoder:
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: t + 0.05 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
               for name, t in decoder_tensors(loaded.model).items()}
    return Decoder(f"sha256:{seed:064x}", tensors)


def request(seed: int, decoder: Decoder | None, prompts=("shirt", "pants")) -> SegmentRequest:
    return SegmentRequest(picture(96, 80, seed=seed), list(prompts), 0.5, decoder=decoder)


def test_a_batch_mixing_decoders_gives_each_image_its_own(loaded):
    engine = FastEngine(loaded, text_cache_size=64, max_decoders=2)
    a, b = perturbed(loaded, 1), perturbed(loaded, 2)
    mixed = [request(0, None), request(1, a), request(2, b), request(3, a, prompts=("hat",))]
    vision_passes = []
    real = engine.activations
    engine.activations = lambda pixels: vision_passes.append(pixels.shape[0]) or real(pixels)  # a spy
    together = engine.segment_batch(mixed)
    assert vision_passes == [4]  # one vision pass for the whole batch, whatever decoders it needs
    for req, got in zip(mixed, together, strict=True):
        alone = engine.segment_batch([req])[0]
        assert torch.allclose(got.logits, alone.logits, atol=1e-5)
    # a fine-tuned decoder changes the answer; the base's is untouched by serving others
    base_again = engine.segment_batch([request(1, None)])[0]
    assert not torch.allclose(together[1].logits, base_again.logits, atol=1e-3)
    assert list(engine._decoders) == [b.revision, a.revision]  # bounded: the last two used


def test_a_tuned_decoder_is_the_base_model_with_those_weights(loaded):
    """The same logits as CLIPSeg whose decoder was loaded with the weights (what eval --model does)."""
    tuned = perturbed(loaded, 3)
    engine = FastEngine(loaded, text_cache_size=64)
    served = engine.segment_batch([request(5, tuned)])[0].logits
    copy_of = copy.deepcopy(loaded)
    copy_of.model.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in tuned.tensors.items()})
    direct = FastEngine(copy_of, text_cache_size=64).segment_batch([request(5, None)])[0].logits
    assert torch.allclose(served, direct, atol=1e-5)


def test_learned_label_embeddings_condition_the_decoder(loaded):
    engine = FastEngine(loaded, text_cache_size=64)
    dim = loaded.model.config.projection_dim
    learned = LearnedLabel("rev:0", torch.randn(dim, generator=torch.Generator().manual_seed(4)))
    image = picture(96, 80, seed=6)
    got = engine.segment_batch([SegmentRequest(image, ["belt"], 0.5, phrasings=[learned])])[0].logits
    as_text = engine.segment_batch([SegmentRequest(image, ["belt"], 0.5)])[0].logits
    assert not torch.allclose(got, as_text, atol=1e-3)
    again = engine.segment_batch([SegmentRequest(image, ["belt"], 0.5, phrasings=[learned])])[0].logits
    assert torch.equal(got, again)
