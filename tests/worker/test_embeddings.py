"""Visual prompts and CLIP embeddings: the fast engine against the plain transformers calls, with
the tolerances of tests/worker/test_engine_equivalence.py (same pixels in: 1e-4; from the image,
where the engine resizes on the device and the processor in PIL: 0.08 at any pixel, 0.01 mean)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.engine import DEVICES, IMAGE_MAX_TOL, IMAGE_MEAN_TOL, PIXEL_TOL, picture
from worker.engine import EmbedQuery, FastEngine, SegmentRequest, StockEngine, VisualPrompt, load_clipseg
from worker.engine.embed import masked_crop, neutral_grey
from worker.engine.fast import TextEmbeddingCache, cache_key

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=DEVICES)
def loaded(request, tiny_model_dir):
    return load_clipseg(str(tiny_model_dir), device=request.param, dtype="fp32")


@pytest.fixture(scope="module")
def engines(loaded):
    return FastEngine(loaded, text_cache_size=64), StockEngine(loaded)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_visual_prompt_matches_the_stock_conditional_pixel_values_call(engines, loaded):
    fast, stock = engines
    image, examples = picture(200, 300, seed=1), [picture(64, 64, seed=7), picture(90, 120, seed=8)]
    # the model math alone: same pixel values for the image and the examples
    pixels = loaded.processor(images=[image], return_tensors="pt")["pixel_values"]
    want = stock.visual_prompt_logits(image, examples)
    with torch.inference_mode():
        # the engine's cache takes the conditional embeddings of the processor's example pixels
        cond = loaded.processor(images=examples, return_tensors="pt")["pixel_values"].to(loaded.device)
        conditional = loaded.model.get_conditional_embeddings(batch_size=2, conditional_pixel_values=cond)
        keys = [VisualPrompt.of(e) for e in examples]
        for key, emb in zip(keys, conditional, strict=True):
            fast.text_cache._items[cache_key(key)] = emb
        got = fast.logits_from_pixels(pixels, [keys])[0]
    assert (torch.sigmoid(got) - torch.sigmoid(want)).abs().max().item() < PIXEL_TOL
    # end to end from the pictures: the engine resizes image and examples itself
    fast.text_cache._items.clear()
    result = fast.segment_batch([SegmentRequest(image, ["gown", "pattern"], 0.5, phrasings=keys)])[0]
    diff = (torch.sigmoid(result.logits) - torch.sigmoid(want.cpu())).abs()
    assert diff.max().item() < IMAGE_MAX_TOL and diff.mean().item() < IMAGE_MEAN_TOL
    assert [m.prompt for m in result.masks] == ["gown", "pattern"]


def test_visual_prompts_are_cached_by_content(engines):
    fast, _ = engines
    example = picture(64, 64, seed=3)
    fast.text_cache._items.clear()
    misses = fast.text_cache.misses
    request = SegmentRequest(picture(96, 96, seed=0), ["a", "b"], 0.5,
                             phrasings=[VisualPrompt.of(example), VisualPrompt.of(example.copy())])
    fast.segment_batch([request, request])
    assert fast.text_cache.misses - misses == 1  # two labels, two jobs, one distinct example


def test_the_label_cache_keeps_digests_not_pixels_and_is_bounded_by_bytes():
    """4,096 entries keyed by examples of up to 50 MP could hold gigabytes: the cache keys an example
    by its digest, and evicts past its byte bound as well as its entry count."""
    entry = 512 * 4 + len("image:") + 64  # a float32 embedding and its key
    cache = TextEmbeddingCache(4096, max_bytes=3 * entry)
    examples = [VisualPrompt.of(np.full((1000, 1000, 3), i, dtype=np.uint8)) for i in range(5)]
    computed: list[int] = []

    def compute(labels):
        computed.append(len(labels))
        return torch.randn(len(labels), 512)

    rows = cache.get_many(examples, compute)
    assert rows.shape == (5, 512) and computed == [5]
    assert len(cache) == 3 and cache.bytes <= 3 * entry
    assert all(isinstance(key, str) and key.startswith("image:") for key in cache._items)
    assert not any(isinstance(value, VisualPrompt) for value in cache._items.values())
    cache.get_many(examples[-3:], compute)  # the three most recent are held
    assert computed == [5]


def test_an_example_is_kept_at_the_models_input_size(engines, loaded):
    fast, stock = engines
    size = (loaded.preprocessing.width, loaded.preprocessing.height)
    big = picture(1600, 1200, seed=9)
    prompt = VisualPrompt.of(big, size=size)
    assert prompt.pixels.shape == (size[1], size[0], 3)
    image = picture(200, 300, seed=1)
    want = stock.visual_prompt_logits(image, [big])  # the processor resizes the full example itself
    result = fast.segment_batch([SegmentRequest(image, ["gown"], 0.5, phrasings=[prompt])])[0]
    diff = (torch.sigmoid(result.logits) - torch.sigmoid(want.cpu())).abs()
    assert diff.max().item() < IMAGE_MAX_TOL and diff.mean().item() < IMAGE_MEAN_TOL


def test_image_embedding_is_clip_image_features_normalised(engines, loaded):
    fast, stock = engines
    images = [picture(200, 300, seed=2), picture(96, 96, seed=4)]
    results = fast.segment_batch([SegmentRequest(img, ["shirt"], 0.5, embed_image=True) for img in images])
    want = stock.image_embeddings(images)
    dim = loaded.model.config.projection_dim
    for result, expected in zip(results, want, strict=True):
        assert result.image_embedding is not None and result.image_embedding.shape == (dim,)
        assert abs(float(np.linalg.norm(result.image_embedding)) - 1) < 1e-5
        assert cosine(result.image_embedding, expected) > 0.995
    # same pixels: the truncated-then-finished tower is exactly get_image_features
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ours = fast.image_features(pixels).float().cpu()
        theirs = loaded.model.clip.get_image_features(pixels.to(loaded.device))
        theirs = (theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output).float().cpu()
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_job_without_embed_has_no_embeddings(engines):
    fast, _ = engines
    result = fast.segment_batch([SegmentRequest(picture(96, 96, seed=0), ["shirt"], 0.5)])[0]
    assert result.image_embedding is None and result.mask_embeddings is None


def test_mask_embeddings_are_the_masked_crops(engines, loaded):
    fast, stock = engines
    image = picture(200, 300, seed=5)
    # threshold 0 keeps every pixel; threshold above 1 keeps none: one full and one empty mask
    full = fast.segment_batch([SegmentRequest(image, ["shirt"], 0.0, embed_masks=True)])[0]
    empty = fast.segment_batch([SegmentRequest(image, ["shirt"], 1.01, embed_masks=True)])[0]
    assert empty.mask_embeddings == [None]
    assert full.mask_embeddings is not None and full.mask_embeddings[0] is not None
    assert cosine(full.mask_embeddings[0], stock.image_embeddings([image])[0]) > 0.995
    # a partial mask: the crop is the box with grey outside the mask, embedded like any image
    result = fast.segment_batch([SegmentRequest(image, ["shirt", "pants"], 0.5, embed_masks=True)])[0]
    grey = neutral_grey(loaded.preprocessing.mean)
    for mask, vector in zip(result.masks, result.mask_embeddings or [], strict=True):
        crop = masked_crop(np.asarray(image), mask.mask, mask.bbox, grey)
        if crop is None:
            assert vector is None
        else:
            assert vector is not None
            assert cosine(vector, stock.image_embeddings([Image.fromarray(crop)])[0]) > 0.995


def test_masked_crop_scales_a_box_from_the_output_size():
    image = np.full((50, 100, 3), 200, dtype=np.uint8)  # decoded at half scale
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[20:60, 40:120] = 255
    mask[20:40, 40:80] = 0  # a hole in the top-left quarter of the box
    crop = masked_crop(image, mask, [40, 20, 120, 60], np.array([1, 2, 3], dtype=np.uint8))
    assert crop is not None and crop.shape == (20, 40, 3)
    assert (crop[:10, :20] == [1, 2, 3]).all() and (crop[10:, 20:] == 200).all()


def test_embedding_only_request_and_queries(engines):
    fast, stock = engines
    image = picture(120, 80, seed=9)
    result = fast.segment_batch([SegmentRequest(image, [], 0.5, embed_image=True)])[0]
    assert result.masks == [] and result.image_embedding is not None
    text, img = fast.embed_queries([EmbedQuery(text="a red floral dress"), EmbedQuery(image=np.asarray(image))])
    assert cosine(text, stock.text_embeddings(["a red floral dress"])[0]) > 0.9999
    assert cosine(img, result.image_embedding) > 0.9999
    with pytest.raises(ValueError):
        fast.embed_queries([EmbedQuery()])


def test_mixed_batch_of_queries_and_segmentations(engines):
    fast, _ = engines
    out = fast.run_batch([EmbedQuery(text="hat"), SegmentRequest(picture(96, 96, seed=1), ["hat"], 0.5)])
    assert isinstance(out[0], np.ndarray) and hasattr(out[1], "masks")
