"""The output kinds from one model pass (tiny model, CPU): soft vs mask, label map vs masks,
COCO RLE vs pycocotools, cutouts, palettes, and prompt ensembles against stock transformers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as coco_mask

from worker.engine import FastEngine, SegmentRequest, StockEngine, Wanted, load_clipseg
from worker.engine.embed import ensemble
from worker.engine.postprocess import upsample
from worker.outputs import coco_rle, cutout_png, encode_outputs, label_map_png, overlay_jpeg, palette

pytestmark = pytest.mark.unit

PROMPTS = ["shirt", "pants", "a long red dress", "shoes"]


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.full((height, width, 3), 128.0)
    for _ in range(5):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        base[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 255, 3)
    base += rng.normal(0, 10, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_clipseg(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def fast(loaded):
    return FastEngine(loaded)


@pytest.fixture(scope="module")
def everything(fast):
    """One pass asking for soft maps and the label map, on a non-square image."""
    image = picture(150, 110, seed=4)
    request = SegmentRequest(image, PROMPTS, 0.5, wanted=Wanted(soft=True, label_map=True))
    return image, fast.segment_batch([request])[0]


def probabilities(result, height, width):
    up = torch.nn.functional.interpolate(result.logits.unsqueeze(1), size=(height, width), mode="bilinear",
                                         align_corners=False).squeeze(1)
    return torch.sigmoid(up).numpy()


def test_soft_is_the_rounded_probability_and_the_mask_its_threshold(everything):
    image, result = everything
    p = probabilities(result, image.height, image.width)
    for index, item in enumerate(result.masks):
        assert item.soft.shape == item.mask.shape == (image.height, image.width) and item.soft.dtype == np.uint8
        assert np.abs(item.soft.astype(np.float64) - 255 * p[index]).max() <= 0.5 + 1e-3
        assert np.array_equal(item.mask == 255, p[index] >= 0.5)
        # what a compositor sees: masked pixels are the ones whose soft value reaches the threshold
        on, off = item.soft[item.mask == 255], item.soft[item.mask == 0]
        assert (on.size == 0 or on.min() >= 127) and (off.size == 0 or off.max() <= 128)
    assert any(0 < (m.mask == 255).mean() < 1 for m in result.masks)  # the case is not degenerate


def test_label_map_is_the_most_probable_label_that_reaches_the_threshold(everything):
    image, result = everything
    p = probabilities(result, image.height, image.width)
    label_map = result.label_map
    assert label_map.shape == (image.height, image.width) and label_map.dtype == np.uint8
    none = ~np.any([m.mask == 255 for m in result.masks], axis=0)
    assert np.array_equal(label_map == 0, none)
    best = p.argmax(axis=0) + 1
    assert np.array_equal(label_map[~none], best[~none])
    for index, item in enumerate(result.masks):
        assert np.all(item.mask[label_map == index + 1] == 255)
    assert len(np.unique(label_map)) > 2


def test_per_label_thresholds_cut_each_mask_and_the_label_map(fast):
    """A preset's calibrated thresholds: each mask at its own, and a label map pixel to the most
    probable of the labels that reach theirs there."""
    image = picture(150, 110, seed=4)
    thresholds = [0.3, 0.7, 0.5, 0.9]
    result = fast.segment_batch([SegmentRequest(image, PROMPTS, thresholds,
                                                wanted=Wanted(label_map=True))])[0]
    p = probabilities(result, image.height, image.width)
    reach = np.stack([p[i] >= t for i, t in enumerate(thresholds)])
    for index, item in enumerate(result.masks):
        assert np.array_equal(item.mask == 255, reach[index])
    masked = np.where(reach, p, -1.0)
    want = np.where(reach.any(axis=0), masked.argmax(axis=0) + 1, 0)
    assert np.array_equal(result.label_map, want)
    assert reach[0].sum() != (p[0] >= 0.5).sum()  # (the thresholds changed something)
    with pytest.raises(ValueError, match="3 thresholds for 4 labels"):
        upsample(result.logits, prompts=PROMPTS, height=20, width=20, threshold=thresholds[:3])


def test_a_pass_without_extras_brings_back_only_masks(fast):
    result = fast.segment(picture(40, 30, seed=1), PROMPTS[:2], 0.5)
    assert result.label_map is None and all(m.soft is None for m in result.masks)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_rle_is_exactly_what_pycocotools_gives(height, width, seed, density):
    mask = (np.random.default_rng(seed).random((height, width)) < density).astype(np.uint8) * 255
    rle = coco_rle(mask)
    want = coco_mask.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    assert rle == {"size": [height, width], "counts": want["counts"].decode("ascii")}
    back = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(back, mask > 0)


def test_cutout_is_the_bbox_crop_with_the_soft_map_as_alpha(everything):
    image, result = everything
    pixels = np.asarray(image)
    item = next(m for m in result.masks if m.bbox is not None)
    x0, y0, x1, y1 = item.bbox
    cut = Image.open(io.BytesIO(cutout_png(pixels, item.soft, item.bbox)))
    assert cut.format == "PNG" and cut.mode == "RGBA" and cut.size == (x1 - x0, y1 - y0)
    rgba = np.asarray(cut)
    assert np.array_equal(rgba[..., :3], pixels[y0:y1, x0:x1])
    assert np.array_equal(rgba[..., 3], item.soft[y0:y1, x0:x1])
    assert cutout_png(pixels, item.soft, None) is None


def test_label_map_png_is_data_and_a_picture(everything):
    image, result = everything
    png = Image.open(io.BytesIO(label_map_png(result.label_map, len(PROMPTS))))
    assert png.format == "PNG" and png.mode == "P" and png.size == image.size
    assert np.array_equal(np.asarray(png), result.label_map)
    colours = np.asarray(png.getpalette()[: 3 * (len(PROMPTS) + 1)]).reshape(-1, 3)
    assert tuple(colours[0]) == (0, 0, 0)
    assert len({tuple(c) for c in colours}) == len(PROMPTS) + 1  # every label its own colour
    rgb = np.asarray(png.convert("RGB"))
    assert np.array_equal(rgb[result.label_map == 1][0], colours[1])


def test_palette_colours_stay_distinct_for_32_labels():
    colours = palette(32)[1:33].astype(int)
    distances = np.abs(colours[:, None, :] - colours[None, :, :]).sum(axis=2) + np.eye(32, dtype=int) * 999
    assert distances.min() >= 20


def test_overlay_tints_labelled_pixels_and_leaves_the_rest():
    """On a smooth picture with block-shaped labels (JPEG's 4:2:0 chroma blurs a speckled map)."""
    yy, xx = np.mgrid[0:96, 0:128]
    pixels = np.stack([xx * 2, yy * 2, np.full_like(xx, 120)], axis=-1).astype(np.uint8)
    label_map = np.zeros((96, 128), dtype=np.uint8)
    label_map[8:40, 8:56] = 1
    label_map[48:88, 64:120] = 3
    jpeg = Image.open(io.BytesIO(overlay_jpeg(pixels, label_map, 3)))
    assert jpeg.format == "JPEG" and jpeg.mode == "RGB" and jpeg.size == (128, 96)
    got = np.asarray(jpeg).astype(float)
    colours = palette(3).astype(float)
    expected = pixels.astype(float)
    tinted = label_map > 0
    expected[tinted] = (expected[tinted] + colours[label_map[tinted]]) / 2
    inner = np.zeros_like(tinted)
    inner[2:-2, 2:-2] = True  # away from the picture's edge
    assert np.abs(got - expected)[inner].mean() < 3
    assert np.abs(got - pixels)[tinted].mean() > 20  # visibly tinted
    assert np.abs(got - pixels)[~tinted & inner].mean() < 3  # and the rest left alone


def test_ensemble_of_one_phrasing_is_that_phrasing():
    e = torch.randn(1, 16)
    assert torch.equal(ensemble(e), e[0])


def test_ensemble_points_along_the_mean_direction_with_the_mean_length():
    e = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    out = ensemble(e)
    assert out.norm().item() == pytest.approx(2.0)
    assert (out / out.norm()).tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])


def test_preset_labels_match_stock_transformers_with_the_same_ensemble(loaded, fast):
    """The engine's ensembled labels against CLIPSegForImageSegmentation called with the ensembled
    conditional embeddings (stock.ensemble_logits), same pixels in."""
    image = picture(120, 90, seed=7)
    phrasings = [("a shirt", "a t-shirt", "a blouse"), ("pants",), ("a dress", "a gown")]
    names = ["upper", "lower", "full"]
    ours = fast.segment_batch([SegmentRequest(image, names, 0.4, phrasings=phrasings)])[0]
    theirs = StockEngine(loaded).run(SegmentRequest(image, names, 0.4, phrasings=phrasings))
    assert [m.prompt for m in ours.masks] == names
    diff = (torch.sigmoid(ours.logits) - torch.sigmoid(theirs.logits)).abs()
    assert diff.max().item() < 0.08 and diff.mean().item() < 0.01
    # a one-phrasing label is the plain prompt
    plain = fast.segment(image, ["pants"], 0.4)
    assert torch.allclose(ours.logits[1], plain.logits[0], atol=1e-4)
    # and ensembling changes what a several-phrasing label segments
    single = fast.segment(image, ["a shirt"], 0.4)
    assert not torch.allclose(ours.logits[0], single.logits[0], atol=1e-3)


def test_encode_outputs_keys_are_deterministic_and_complete(everything):
    image, result = everything

    class Row:
        tenant_id, id = "ten_1", "job-1"

    labels = [{"name": p, "prompts": [p], "source": "text"} for p in PROMPTS]
    outputs = ["mask", "soft", "rle", "cutout", "label_map", "overlay"]
    first = encode_outputs(Row(), labels, outputs, image, result)  # type: ignore[arg-type]
    again = encode_outputs(Row(), labels, outputs, image, result)  # type: ignore[arg-type]
    assert [k for k, _, _ in first.uploads] == [k for k, _, _ in again.uploads]
    assert first.output_keys == {"label_map": "masks/ten_1/job-1/label_map.png",
                                 "overlay": "masks/ten_1/job-1/overlay.jpg"}
    entry = first.results[0]
    assert entry["mask_key"] == "masks/ten_1/job-1/0.png" and entry["soft_key"] == "masks/ten_1/job-1/0.soft.png"
    assert entry["rle"]["size"] == [image.height, image.width]
    only_rle = encode_outputs(Row(), labels, ["rle"], image, result)  # type: ignore[arg-type]
    assert only_rle.uploads == [] and only_rle.output_keys == {}
    assert set(only_rle.results[0]) == {"prompt", "source", "bbox", "area_fraction", "score", "rle", "refine"}


@given(st.integers(1, 30), st.integers(1, 30), st.sampled_from([None, 3, 4]), st.booleans(),
       st.integers(0, 2**32 - 1), st.sampled_from(["isal", "zlib"]))
def test_our_png_encoder_round_trips_through_pillow(height, width, channels, sub_filter, seed, deflate):
    from worker.outputs import encode_png

    shape = (height, width) if channels is None else (height, width, channels)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    png = Image.open(io.BytesIO(encode_png(pixels, sub_filter=sub_filter, deflate=deflate)))
    assert png.format == "PNG" and png.mode == {None: "L", 3: "RGB", 4: "RGBA"}[channels]
    assert np.array_equal(np.asarray(png), pixels)


def test_the_worker_deflates_with_isal_and_masks_decode_the_same():
    """ISA-L is the worker's deflate (a worker dependency); a 1024x1536 mask shaped like a real one
    decodes to the same pixels as zlib's, and is no larger."""
    from evaluation.edges import garment, logits_of
    from worker.engine.postprocess import upsample
    from worker.engine.types import Wanted
    from worker.outputs import DEFLATE, encode_png

    assert DEFLATE == "isal"
    g = garment(0)
    masks, _ = upsample(logits_of(g.coarse), prompts=["garment"], height=1536, width=1024, threshold=0.4,
                        wanted=Wanted(soft=True))
    for item in masks:
        for pixels, sub_filter in ((item.mask, False), (item.soft, True)):
            fast, plain = (encode_png(pixels, sub_filter=sub_filter, deflate=d) for d in ("isal", "zlib"))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), pixels)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(plain))), pixels)
            assert len(fast) <= len(plain)


def test_png_encoder_refuses_what_it_cannot_write():
    from worker.outputs import encode_png

    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros(4, dtype=np.uint8))


def jpeg_bytes(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [None, 1, 6, 8, 3])
def test_reduced_decode_keeps_the_full_size_and_orientation(orientation):
    from shared.images import decode

    data = jpeg_bytes(picture(1024, 1536, seed=3), orientation)
    full = decode(data, max_pixels=10**8)
    small = decode(data, max_pixels=10**8, at_least=(352, 352))
    assert small.size == full.size == full.image.size and not full.reduced
    assert small.reduced and min(small.image.size) >= 352 and small.image.size[0] * 2 == full.size[0]
    # the same picture: the small decode is the full one shrunk (DCT scaling against an area average)
    shrunk = np.asarray(full.image.resize(small.image.size, Image.Resampling.BOX)).astype(int)
    assert np.abs(np.asarray(small.image).astype(int) - shrunk).mean() < 4


def test_only_jpegs_are_decoded_reduced():
    from shared.images import decode

    buf = io.BytesIO()
    picture(800, 600, seed=1).save(buf, format="PNG")
    decoded = decode(buf.getvalue(), max_pixels=10**8, at_least=(96, 96))
    assert decoded.image.size == decoded.size == (800, 600)


def test_reduced_decode_changes_probabilities_within_the_stated_bounds(fast):
    """The engine fed a DCT-reduced decode (what the worker does for mask/soft/rle/label_map jobs)
    against the full decode of the same JPEG. Stated bounds: the model's input (the image resized
    to its input size) differs by under 1 level of 255 on average and 10 at the 99th percentile;
    masks come out at the full size and agree on 97% of pixels; probabilities differ by under 0.02
    on average. (The tiny model's random weights amplify pixel noise, so no per-pixel probability
    bound is stated for it; its 96-pixel input also makes the decode scale harsher than the real
    checkpoint's 352.)"""
    from shared.images import decode

    for seed, (width, height) in enumerate([(1024, 1536), (640, 480), (333, 1000)]):
        data = jpeg_bytes(picture(width, height, seed=seed))
        full = decode(data, max_pixels=10**8)
        small = decode(data, max_pixels=10**8, at_least=(96, 96))  # the tiny model's input size
        assert small.reduced
        levels = (fast.preprocess([np.asarray(full.image)]) - fast.preprocess([np.asarray(small.image)])).abs()
        levels = levels * torch.tensor(fast.loaded.preprocessing.std).view(1, 3, 1, 1) * 255
        assert levels.mean().item() < 1 and torch.quantile(levels.flatten(), 0.99).item() < 10, (
            width, height, levels.mean().item(), torch.quantile(levels.flatten(), 0.99).item())
        a = fast.segment_batch([SegmentRequest(full.image, PROMPTS, 0.4)])[0]
        b = fast.segment_batch([SegmentRequest(small.image, PROMPTS, 0.4, size=small.size)])[0]
        assert [m.mask.shape for m in b.masks] == [(height, width)] * len(PROMPTS)
        assert (torch.sigmoid(a.logits) - torch.sigmoid(b.logits)).abs().mean().item() < 0.02
        agree = np.mean([(x.mask == y.mask).mean() for x, y in zip(a.masks, b.masks, strict=True)])
        assert agree > 0.97


@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1),
       st.sampled_from([0.0, 0.02, 0.3, 0.5, 0.97, 1.0]))
def test_boxes_and_areas_are_those_of_the_masks(labels, height, width, seed, threshold):
    """Each mask's bbox is the tight box of its pixels (None when empty) and its area their share."""
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 3, (labels, 8, 8)).astype(np.float32))
    masks, _ = upsample(logits, prompts=[str(i) for i in range(labels)], height=height, width=width,
                        threshold=threshold)
    for item in masks:
        on = item.mask == 255
        assert item.area_fraction == on.sum() / (height * width)
        if not on.any():
            assert item.bbox is None
            continue
        ys, xs = np.nonzero(on)
        assert item.bbox == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_instances_are_the_8_connected_parts_scored_by_mean_probability():
    from worker.outputs import InstanceRules, instances_of

    mask = np.zeros((100, 100), np.uint8)
    soft = np.zeros((100, 100), np.uint8)
    mask[10:20, 10:20], soft[10:20, 10:20] = 255, 150  # a square
    mask[50:60, 50:55], soft[50:60, 50:55] = 255, 240  # an L whose two arms touch only at a corner:
    mask[60:65, 55:70], soft[60:65, 55:70] = 255, 240  # 8-connected, so one instance
    mask[90, 90], soft[90, 90] = 255, 255  # one pixel: under 0.1% of the image
    found = instances_of(mask, soft, InstanceRules(min_fraction=0.001, limit=100))
    assert [f["bbox"] for f in found] == [[50, 50, 70, 65], [10, 10, 20, 20]]  # best first
    assert [f["score"] for f in found] == [pytest.approx(240 / 255, abs=1e-6), pytest.approx(150 / 255, abs=1e-6)]
    assert [f["area_fraction"] for f in found] == [pytest.approx(0.0125), pytest.approx(0.01)]
    for instance in found:  # each rle is the instance's own mask, inside the label's
        own = coco_mask.decode({"size": instance["rle"]["size"], "counts": instance["rle"]["counts"].encode()})
        ys, xs = np.nonzero(own)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == instance["bbox"]
        assert (mask[own > 0] == 255).all()
    assert len(instances_of(mask, soft, InstanceRules(min_fraction=0.00001, limit=100))) == 3  # the speck counts
    assert len(instances_of(mask, soft, InstanceRules(limit=1))) == 1
    assert instances_of(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)) == []
