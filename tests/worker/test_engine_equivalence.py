"""The fast engine against stock `CLIPSegForImageSegmentation` fed by `CLIPSegProcessor`.

Stated tolerances (fp32, tiny random-weight model; on every device present: the CPU always, CUDA
where torch sees one, with TF32 off so that fp32 means fp32):
- Same pixel values in (the model math alone: truncated vision encoder, per-prompt expansion,
  cached text embeddings, batching): probabilities within 1e-4.
- From the image (the engine resizes on the device with antialiased bilinear; the processor
  resizes in PIL): probabilities within 0.08 at any pixel and 0.01 on average. Random weights
  amplify pixel noise, which the trained checkpoint does not: these bounds are loose on purpose.
- The engine in bf16 (the GPU worker's default; the CPU's where it multiplies bf16 natively)
  against stock fp32, on every device present: probabilities within BF16_MAX_TOL at any pixel
  and BF16_MEAN_TOL on average, masks agreeing on 97% of pixels.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.support.engine import BF16_MAX_TOL, BF16_MEAN_TOL, DEVICES, IMAGE_MAX_TOL, IMAGE_MEAN_TOL, PIXEL_TOL, picture
from worker.engine import FastEngine, SegmentRequest, StockEngine, load_clipseg
from worker.engine.batcher import DynamicBatcher

pytestmark = pytest.mark.unit  # no Postgres, Redis, S3 or worker process

PROMPT_SETS = {
    1: ["shirt"],
    3: ["shirt", "pants", "a long red dress"],
    8: ["shirt", "pants", "dress", "shoes", "hat", "jacket", "skirt", "a bag with a strap"],
}
SIZES = [(96, 96), (120, 80), (200, 300), (1536, 1024), (37, 500)]  # (width, height)


@pytest.fixture(scope="module", params=DEVICES)
def loaded(request, tiny_model_dir):
    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return load_clipseg(str(tiny_model_dir), device=request.param, dtype="fp32")


@pytest.fixture(scope="module")
def engines(loaded):
    return FastEngine(loaded, text_cache_size=64), StockEngine(loaded)


def probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


@pytest.mark.parametrize("n_prompts", sorted(PROMPT_SETS))
def test_same_pixels_same_probabilities(engines, loaded, n_prompts):
    fast, stock = engines
    prompts = PROMPT_SETS[n_prompts]
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    batched = fast.logits_from_pixels(pixels, [prompts] * len(images))
    for image, got in zip(images, batched, strict=True):
        inputs = loaded.processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
        with torch.inference_mode():
            want = loaded.model(**{k: v.to(loaded.device) for k, v in inputs.items()}).logits
        want = want.reshape(len(prompts), *got.shape[-2:])
        assert (probs(got) - probs(want)).abs().max().item() < PIXEL_TOL


@pytest.mark.parametrize("n_prompts", sorted(PROMPT_SETS))
@pytest.mark.parametrize("batched", [False, True])
def test_images_match_the_processor_path(engines, n_prompts, batched):
    fast, stock = engines
    prompts = PROMPT_SETS[n_prompts]
    images = [picture(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES)]
    requests = [SegmentRequest(img, prompts, 0.4) for img in images]
    results = fast.segment_batch(requests) if batched else [fast.segment_batch([r])[0] for r in requests]
    for image, result in zip(images, results, strict=True):
        diff = (probs(result.logits) - probs(stock.stock_logits(image, prompts).cpu())).abs()
        assert diff.max().item() < IMAGE_MAX_TOL, (image.size, diff.max().item())
        assert diff.mean().item() < IMAGE_MEAN_TOL, (image.size, diff.mean().item())
        assert [m.mask.shape for m in result.masks] == [(image.height, image.width)] * len(prompts)


def test_masks_agree_with_stock_masks(engines):
    fast, stock = engines
    image = picture(300, 400, seed=3)
    ours = fast.segment(image, PROMPT_SETS[3], 0.4)
    theirs = stock.segment(image, PROMPT_SETS[3], 0.4)
    for a, b in zip(ours.masks, theirs.masks, strict=True):
        assert (a.mask == b.mask).mean() > 0.97
        assert a.score == pytest.approx(b.score, abs=IMAGE_MAX_TOL)


def test_mixed_prompt_counts_in_one_batch(engines):
    """Jobs with different prompt lists share one forward pass and get their own results back."""
    fast, stock = engines
    images = [picture(64 + 20 * i, 80, seed=i) for i in range(3)]
    prompt_lists = [PROMPT_SETS[1], PROMPT_SETS[8], PROMPT_SETS[3]]
    results = fast.segment_batch([SegmentRequest(i, p, 0.4) for i, p in zip(images, prompt_lists, strict=True)])
    for image, prompts, result in zip(images, prompt_lists, results, strict=True):
        assert [m.prompt for m in result.masks] == prompts
        single = fast.segment(image, prompts, 0.4)
        assert torch.allclose(result.logits, single.logits, atol=1e-4)


def test_vision_encoder_stops_at_the_deepest_extracted_layer(engines, loaded):
    fast, _ = engines
    layers = loaded.model.clip.vision_model.encoder.layers
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        fast.segment(picture(50, 50, seed=1), PROMPT_SETS[3], 0.4)
    finally:
        for hook in hooks:
            hook.remove()
    depth = max(loaded.model.config.extract_layers) + 1
    assert depth < len(layers)
    assert calls == [1] * depth + [0] * (len(layers) - depth)  # once per image, not per prompt


def test_text_embeddings_are_cached_and_bounded(loaded):
    fast = FastEngine(loaded, text_cache_size=3)
    image = picture(40, 40, seed=2)
    fast.segment(image, ["a", "b"], 0.4)
    assert (fast.text_cache.hits, fast.text_cache.misses) == (0, 2)
    fast.segment(image, ["b", "a"], 0.4)
    assert (fast.text_cache.hits, fast.text_cache.misses) == (2, 2)
    fast.segment(image, ["c", "d"], 0.4)
    assert len(fast.text_cache) == 3  # "b" (least recently used) evicted
    fast.segment(image, ["b"], 0.4)
    assert fast.text_cache.misses == 5


def test_dynamic_batcher_gathers_concurrent_requests(engines):
    fast, _ = engines
    batcher = DynamicBatcher(fast.segment_batch, max_batch=8, max_wait_ms=200)
    images = [picture(60 + i, 70, seed=i) for i in range(8)]
    results: dict[int, object] = {}

    def submit(i: int) -> None:
        results[i] = batcher(SegmentRequest(images[i], PROMPT_SETS[3], 0.4), timeout=60)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert max(batcher.batch_sizes) > 1 and sum(batcher.batch_sizes) == 8
    for i, image in enumerate(images):
        alone = fast.segment(image, PROMPT_SETS[3], 0.4)
        assert torch.allclose(results[i].logits, alone.logits, atol=1e-4)


def test_one_bad_request_does_not_fail_its_batch(engines):
    fast, _ = engines
    batcher = DynamicBatcher(fast.segment_batch, max_batch=4, max_wait_ms=100)
    good = batcher.submit(SegmentRequest(picture(30, 30, seed=1), ["a"], 0.4))
    bad = batcher.submit(SegmentRequest(np.zeros((5, 5), dtype=np.float32), ["a"], 0.4))
    assert good.result(timeout=60).masks[0].mask.shape == (30, 30)
    with pytest.raises(ValueError, match="RGB uint8"):
        bad.result(timeout=60)
    batcher.close()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_engine_matches_stock_fp32(tiny_model_dir, device):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    stock = StockEngine(load_clipseg(str(tiny_model_dir), device=device, dtype="fp32"))
    fast = FastEngine(load_clipseg(str(tiny_model_dir), device=device, dtype="bf16", cpu_dtype="bf16"))
    assert fast.loaded.dtype == torch.bfloat16
    prompts = PROMPT_SETS[3]
    images = [picture(w, h, seed=20 + i) for i, (w, h) in enumerate(SIZES)]
    results = fast.segment_batch([SegmentRequest(img, prompts, 0.4) for img in images])
    for image, result in zip(images, results, strict=True):
        theirs = stock.segment(image, prompts, 0.4)
        diff = (probs(result.logits) - probs(theirs.logits)).abs()
        assert diff.max().item() < BF16_MAX_TOL, (image.size, diff.max().item())
        assert diff.mean().item() < BF16_MEAN_TOL, (image.size, diff.mean().item())
        for a, b in zip(result.masks, theirs.masks, strict=True):
            assert (a.mask == b.mask).mean() > 0.97


def test_the_cpu_runs_bf16_only_where_it_multiplies_bf16_natively(tiny_model_dir):
    from worker.engine.loading import native_cpu_bf16

    auto = load_clipseg(str(tiny_model_dir), device="cpu", cpu_dtype="auto")
    assert auto.dtype == (torch.bfloat16 if native_cpu_bf16() else torch.float32)
    assert load_clipseg(str(tiny_model_dir), device="cpu").dtype == torch.float32  # the library default


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_any_vision_chunk_gives_the_same_logits(loaded, chunk):
    """Images through the vision encoder (and the decoder) one, two or all at a time: the same
    logits, label groups of any size (none included) staying with their image."""
    fast = FastEngine(loaded, text_cache_size=64, vision_chunk=chunk)
    whole = FastEngine(loaded, text_cache_size=64, vision_chunk=0)
    images = [picture(w, h, seed=20 + i) for i, (w, h) in enumerate(SIZES)]
    groups = [PROMPT_SETS[3], [], PROMPT_SETS[1], PROMPT_SETS[8], []]
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    got = fast.logits_from_pixels(pixels, groups)
    want = whole.logits_from_pixels(pixels, groups)
    for labels, a, b in zip(groups, got, want, strict=True):
        assert a.shape == b.shape == (len(labels), *pixels.shape[-2:])
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize("complex_upconv", [True, False])
def test_the_decoder_matches_transformers_with_either_transposed_convolution(tiny_model_dir, tmp_path, complex_upconv,
                                                                            chunk):
    """The engine's own decoder pass (reductions before the per-label repeat, stride-equals-kernel
    transposed convolutions as matmuls) against CLIPSegDecoder.forward, for both of CLIPSeg's
    decoder heads (the refined checkpoint's three-step one, and the single transposed conv)."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["use_complex_transposed_convolution"] = complex_upconv
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)  # the plain head's weights are not in the files: initialised at load
    model = load_clipseg(str(folder), device="cpu", dtype="fp32")
    head = model.model.decoder.transposed_convolution
    assert isinstance(head, torch.nn.Sequential) == complex_upconv
    with torch.no_grad():  # random-weight models are saved with zero biases: give them some
        for name, param in model.model.decoder.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    fast = FastEngine(model, text_cache_size=0, vision_chunk=chunk)
    pixels = model.processor(images=[picture(120, 80, seed=1), picture(64, 64, seed=2)],
                             return_tensors="pt")["pixel_values"]
    groups = [PROMPT_SETS[3], PROMPT_SETS[1]]
    got = fast.logits_from_pixels(pixels, groups)
    with torch.inference_mode():
        activations = fast.activations(pixels)
        index = torch.tensor([0, 0, 0, 1])
        conditional = fast._label_embeddings([(p,) for group in groups for p in group])
        want = model.model.decoder([a.index_select(0, index) for a in activations], conditional).logits
    assert torch.allclose(torch.cat(got), want.reshape(4, *pixels.shape[-2:]), atol=1e-5)


def test_prompts_past_the_text_models_positions_are_truncated_as_clip_does(engines, loaded):
    """A prompt longer than CLIP's 77 tokens runs (it used to fail its job and its whole dynamic batch):
    it is cut to the first 77 tokens, so anything after that changes nothing, in both engines."""
    fast, stock = engines
    limit = loaded.model.config.text_config.max_position_embeddings
    long = "a long sleeved striped cotton shirt with buttons " * 4
    assert len(loaded.tokenizer(long)["input_ids"]) > limit  # (untruncated)
    image = picture(120, 80, seed=3)
    pixels = loaded.processor(images=[image], return_tensors="pt")["pixel_values"]
    a = fast.logits_from_pixels(pixels, [[long, "shirt"]])
    b = fast.logits_from_pixels(pixels, [[long + " and a collar", "shirt"]])
    assert torch.allclose(a[0], b[0], atol=1e-5), (a[0] - b[0]).abs().max()
    reference = stock.stock_logits(image, [long, "shirt"])
    assert torch.allclose(probs(a[0]), probs(reference), atol=PIXEL_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_results_come_to_the_host_exactly_and_from_cuda_through_pinned_memory(device):
    from worker.engine.postprocess import to_host

    values = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, device=device)
    out = to_host(values * 1)  # a temporary, as upsample hands it over
    assert out.dtype == np.uint8 and out.shape == (3, 37, 53) and np.array_equal(out, values.cpu().numpy())
    assert torch.from_numpy(out).is_pinned() == (device == "cuda")
