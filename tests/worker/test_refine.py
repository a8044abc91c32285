"""The guided filter and the matte behind `refine` (worker/engine/refine.py), and the engines using
them: a step edge sharpened and snapped to the photo's edge, a flat region unchanged, output in
[0, 1]; on synthetic garments the boundary gets closer to the truth; the matte is soft only near
the outline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.edges import boundary_f, garment, iou, logits_of
from worker.engine import FastEngine, SegmentRequest, StockEngine, Wanted, load_clipseg
from worker.engine.postprocess import upsample
from worker.engine.refine import GuidedParams, guide_of, guided, matte, matte_region, trimap

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def step_photo(height: int = 120, width: int = 200, edge: int = 100) -> np.ndarray:
    """Dark left of column `edge`, bright from it, a little noise."""
    rng = np.random.default_rng(0)
    image = np.where(np.arange(width)[None, :, None] < edge, 40.0, 200.0) + rng.normal(0, 3, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def ramp(height: int, width: int, centre: float, half_width: float) -> torch.Tensor:
    """(1, H, W) probability rising linearly across columns from 0 to 1 around `centre`."""
    x = torch.arange(width, dtype=torch.float32)
    row = ((x - centre) / (2 * half_width) + 0.5).clamp(0, 1)
    return row.expand(height, width).unsqueeze(0).clone()


def crossing(row: torch.Tensor) -> int:
    """The first column where the profile reaches 0.5."""
    return int(torch.nonzero(row >= 0.5)[0])


def steepest(row: torch.Tensor) -> tuple[int, float]:
    """(the column where the profile's largest rise ends, that rise)."""
    steps = torch.diff(row)
    return int(steps.argmax()) + 1, float(steps.max())


def test_a_soft_step_becomes_sharp_and_moves_onto_the_photos_edge():
    image = step_photo()
    prob = ramp(120, 200, centre=112, half_width=20)  # soft, and 12 px off the true edge at 100
    out = guided(prob, guide_of(image, device=CPU), GuidedParams(radius=24, eps=1e-3, subsample=1))
    before, after = prob[0, 60], out[0, 60]
    assert steepest(before)[1] < 0.03  # a 40-pixel ramp
    column, rise = steepest(after)
    assert rise > 0.35 and column == 100  # a step, at the photo's edge
    assert abs(crossing(after) - 100) <= 3  # the outline moves there from 12 px off
    assert abs(crossing(before) - 112) <= 1


def test_a_flat_region_is_unchanged():
    image = np.full((80, 90, 3), 128, dtype=np.uint8)
    image[:, 45:] = 60  # an edge in the photo, but the map is flat everywhere
    prob = torch.full((2, 80, 90), 0.3)
    prob[1] = 0.85
    out = guided(prob, guide_of(image, device=CPU))
    assert torch.allclose(out, prob, atol=1e-4)


def test_output_is_a_probability_whatever_the_input():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    prob = torch.from_numpy(rng.random((3, 64, 96)).astype(np.float32))
    prob[1] = (prob[1] > 0.5).float()  # hard steps overshoot an unclamped filter
    out = guided(prob, guide_of(image, device=CPU), GuidedParams(radius=3, eps=1e-6, subsample=1))
    assert out.dtype == torch.float32 and out.shape == prob.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_the_parameters_scale_with_the_image():
    small, large = GuidedParams.for_size(352, 352), GuidedParams.for_size(1536, 1024)
    assert large.radius == 46 and large.subsample == 8
    assert small.radius == 12 and small.subsample == 2
    assert GuidedParams.for_size(4, 4).radius >= 1


def test_guides_of_another_size_are_brought_to_the_output_size():
    guide = guide_of(np.zeros((30, 40, 3), dtype=np.uint8), device=CPU, size=(80, 60))
    assert guide.shape == (1, 3, 60, 80)
    with pytest.raises(ValueError, match="differ in size"):
        guided(torch.zeros((1, 30, 40)), guide)


def test_on_synthetic_garments_the_outline_gets_closer_to_the_truth():
    """bench/refine.py's measurement, on three garments at full size: boundary F at 1 px rises by
    at least 0.10 and IoU does not drop (bench/README.md has the figures over 24)."""
    scores: dict[str, list[tuple[float, float]]] = {"bilinear": [], "guided": []}
    for seed in range(3):
        g = garment(seed)
        height, width = g.truth.shape
        for name, guide in (("bilinear", None), ("guided", guide_of(g.image, device=CPU))):
            masks, _ = upsample(logits_of(g.coarse), prompts=["garment"], height=height, width=width,
                                threshold=0.5, guide=guide)
            pred = masks[0].mask > 0
            scores[name].append((boundary_f(pred, g.truth, 1), iou(pred, g.truth)))
            assert masks[0].refine == ("none" if guide is None else "guided")
    before, after = np.mean(scores["bilinear"], axis=0), np.mean(scores["guided"], axis=0)
    assert after[0] >= before[0] + 0.10, (before, after)
    assert after[1] >= before[1], (before, after)


def test_the_trimap_marks_a_band_around_the_outline():
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:40, 20:50] = True
    tri = trimap(mask, 3)
    assert set(np.unique(tri).tolist()) == {0.0, 0.5, 1.0}
    assert tri[25, 35] == 1.0 and tri[2, 2] == 0.0
    assert (tri[25, 17:23] == 0.5).all()  # 3 px outside the outline, 3 px inside
    assert tri[25, 16] == 0.0 and tri[25, 23] == 1.0


def test_the_matte_is_soft_near_the_outline_and_exact_elsewhere():
    rng = np.random.default_rng(2)
    height, width = 96, 128
    # a bright square with a 4-pixel soft border, on a dark textured background
    yy, xx = np.mgrid[0:height, 0:width]
    dist = np.minimum.reduce([xx - 40, 88 - xx, yy - 24, 72 - yy]).astype(np.float32)
    alpha = np.clip(dist / 4 + 0.5, 0, 1)
    image = (alpha[..., None] * 220 + (1 - alpha[..., None]) * (30 + rng.normal(0, 4, (height, width, 3))))
    image = np.clip(image, 0, 255).astype(np.uint8)
    mask = alpha >= 0.5
    region = matte_region(mask)
    assert region is not None and region.pixels < height * width
    out = matte(image, mask, region)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert out[48, 64] == 255 and out[5, 5] == 0  # known inside and outside
    edge = out[48, 36:44]  # across the soft left border
    assert np.all(np.diff(edge.astype(int)) >= -8)  # rising
    assert edge[0] < 60 and edge[-1] > 200 and ((edge > 20) & (edge < 235)).sum() >= 2
    truth = (alpha * 255).round()
    assert np.abs(out.astype(float) - truth)[16:80, 32:96].mean() < 12


def test_nothing_to_matte_without_an_outline():
    assert matte_region(np.zeros((40, 40), dtype=bool)) is None
    assert matte_region(np.ones((40, 40), dtype=bool)) is None


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    loaded = load_clipseg(str(tiny_model_dir), device="cpu", dtype="fp32")
    return FastEngine(loaded, text_cache_size=16), StockEngine(loaded)


@pytest.mark.parametrize("refine", ["none", "guided"])
def test_both_engines_refine_alike_at_the_images_size(engines, refine):
    fast, stock = engines
    image = step_photo(150, 210, edge=90)
    request = SegmentRequest(image, ["shirt", "pants"], 0.5, wanted=Wanted(soft=True, label_map=True),
                             refine=refine)
    a, b = fast.segment_batch([request])[0], stock.run(request)
    for x, y in zip(a.masks, b.masks, strict=True):
        assert x.mask.shape == (150, 210) and x.refine == y.refine == refine
        assert x.soft is not None and y.soft is not None
        assert np.abs(x.soft.astype(int) - y.soft.astype(int)).mean() < 3
    assert a.label_map is not None and a.label_map.shape == (150, 210)


def test_a_refined_job_follows_the_photo_where_bilinear_does_not(engines):
    """The same logits, upsampled plain and guided: only the guided soft map changes at the photo's
    edge, so the refined map's steepest step sits on it."""
    fast, _ = engines
    image = step_photo(120, 200, edge=100)
    logits = F.interpolate(ramp(120, 200, 112, 30).clamp(0.01, 0.99).logit()[None], size=(22, 22),
                           mode="area")[0]
    plain, _ = upsample(logits, prompts=["x"], height=120, width=200, threshold=0.5, wanted=Wanted(soft=True))
    sharp, _ = upsample(logits, prompts=["x"], height=120, width=200, threshold=0.5, wanted=Wanted(soft=True),
                        guide=guide_of(image, device=CPU))
    assert plain[0].soft is not None and sharp[0].soft is not None
    jump_plain = np.abs(np.diff(plain[0].soft[60].astype(int))).max()
    jump_sharp = np.diff(sharp[0].soft[60].astype(int))
    assert jump_sharp.max() > 3 * jump_plain
    assert abs(int(jump_sharp.argmax()) + 1 - 100) <= 2
    with pytest.raises(ValueError, match="unknown refine"):
        fast.segment_batch([SegmentRequest(image, ["x"], 0.5, refine="sharpest")])


def test_mattes_stop_at_the_pixel_bound_and_say_so():
    """Labels are matted in order while the solved pixels fit the bound; the rest keep the guided
    soft map and say refine: guided, as does a label with no outline."""
    from worker.engine.refine import apply_mattes
    from worker.engine.types import PromptMask

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)

    def label(x0: int) -> PromptMask:
        mask = np.zeros((60, 80), dtype=np.uint8)
        mask[20:40, x0:x0 + 20] = 255
        return PromptMask("x", mask, 0.9, None, 0.1, soft=mask.copy(), refine="guided")

    empty = PromptMask("none", np.zeros((60, 80), dtype=np.uint8), 0.1, None, 0.0,
                       soft=np.zeros((60, 80), dtype=np.uint8), refine="guided")
    masks = [label(5), empty, label(50)]
    one = matte_region(masks[0].mask > 0)
    assert one is not None
    solved = apply_mattes(image, masks, max_pixels=one.pixels + 10)  # room for one label's region
    assert solved == one.pixels
    assert [m.refine for m in masks] == ["matting", "guided", "guided"]
    assert np.array_equal(masks[2].soft, masks[2].mask)  # untouched
    everything = [label(5), empty, label(50)]
    apply_mattes(image, everything, max_pixels=10**9)
    assert [m.refine for m in everything] == ["matting", "guided", "matting"]


def test_concurrent_jobs_solve_mattes_within_the_process_budget():
    """Eight job threads matting at once: the pixels being solved never pass the process's budget
    (each label waits for its pixels), and every label is still matted exactly as alone."""
    import threading

    from worker.engine.refine import PixelBudget, apply_mattes
    from worker.engine.types import PromptMask

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)

    def labels() -> list[PromptMask]:
        out = []
        for x0 in (5, 45):
            mask = np.zeros((60, 80), dtype=np.uint8)
            mask[20:40, x0:x0 + 20] = 255
            out.append(PromptMask("x", mask, 0.9, None, 0.1, soft=mask.copy(), refine="guided"))
        return out

    alone = labels()
    apply_mattes(image, alone, max_pixels=10**9)
    region = matte_region(alone[0].mask > 0)
    assert region is not None
    budget = PixelBudget(2 * region.pixels + 1)  # room for two labels' mattes at a time
    jobs = [labels() for _ in range(8)]
    threads = [threading.Thread(target=apply_mattes, args=(image, masks), kwargs={"max_pixels": 10**9,
                                                                              "budget": budget}) for masks in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.in_use == 0 and 0 < budget.peak <= budget.pixels  # shared, never exceeded
    for masks in jobs:
        assert [m.refine for m in masks] == ["matting", "matting"]
        assert all(np.array_equal(m.soft, a.soft) for m, a in zip(masks, alone, strict=True))
    lone = PixelBudget(10)  # a matte larger than the whole budget runs alone rather than never
    assert apply_mattes(image, labels(), max_pixels=10**9, budget=lone) == 2 * region.pixels


def test_refine_map_takes_any_models_mask_at_any_size():
    """`clipmask refine`'s function: a coarse map of another size comes back at the photo's size,
    its outline moved onto the photo's edge."""
    from worker.engine.refine import refine_map

    image = step_photo(480, 800, edge=400)
    coarse = (ramp(30, 50, centre=25.25, half_width=2)[0].numpy() * 255).astype(np.uint8)
    bilinear = F.interpolate(torch.from_numpy(coarse / 255.0)[None, None], size=(480, 800), mode="bilinear",
                             align_corners=False)[0, 0, 240].numpy()
    assert int(np.argmax(bilinear >= 0.5)) == 412  # 12 px right of the photo's edge
    out, method = refine_map(image, coarse, "guided")
    assert method == "guided" and out.shape == (480, 800) and out.dtype == np.uint8
    assert abs(int(np.argmax(out[240] >= 128)) - 400) <= 3
    matted, method = refine_map(image, coarse, "matting")
    assert method == "matting" and matted.shape == (480, 800)
    assert abs(int(np.argmax(matted[240] >= 128)) - 400) <= 3
    assert refine_map(image, coarse, "matting", max_matte_pixels=10)[1] == "guided"
    with pytest.raises(ValueError, match="guided or matting"):
        refine_map(image, coarse, "none")


def test_warm_up_leaves_the_matting_kernels_ready():
    """The worker calls warm_up at start (in the background): afterwards a matte costs no compile."""
    from worker.engine.refine import warm_up

    assert warm_up() >= 0.0
    assert warm_up() < 2.0
