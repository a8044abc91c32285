"""The SAM 3 family against stock transformers, on a tiny random-weight SAM 3 built with the real
classes (`clipmask dev-model --family sam3`).

The stock side (Sam3Processor -> Sam3Model once per prompt -> post_process_instance_segmentation)
needs torchvision, which does not import beside this project's CPU torch; it runs in the reference
environment that `make stock-venv` builds (torch 2.14.1 + torchvision 0.29.1, the same
transformers), as tests/worker/sam3_stock.py, and writes what it found for these tests to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.types import BoxPrompt, SegmentRequest, Wanted

ROOT = Path(__file__).resolve().parents[2]
LONG = ("a long red summer dress with white buttons down the front, short puffed sleeves, a thin black "
        "leather belt at the waist and a pleated skirt that reaches below the knees")
TEXTS = ["shirt", "pants", "shoe", LONG]
BOX = [20.0, 30.0, 120.0, 110.0]
NEGATIVE = [5.0, 5.0, 40.0, 25.0]


def stock_python() -> str:
    python = os.environ.get("CLIPMASK_STOCK_PYTHON") or str(ROOT / ".venv-stock" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"{python} is missing: `make stock-venv` builds the reference environment")
    return python


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.devmodel import write_sam3_dev_model

    return write_sam3_dev_model(tmp_path_factory.mktemp("tiny-sam3"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sam3-images")
    rng = np.random.default_rng(3)
    paths = []
    for n, (h, w) in enumerate([(150, 200), (90, 61)]):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 64) * 4], axis=-1).astype(np.int16)
        arr += rng.integers(-20, 20, arr.shape, dtype=np.int16)
        path = folder / f"{n}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def cases(images: list[Path]) -> list[dict]:
    found = [{"image": str(img), "text": text, "threshold": 0.5} for img in images for text in TEXTS]
    found.append({"image": str(images[0]), "text": None, "boxes": [BOX], "box_labels": [1], "threshold": 0.5})
    found.append({"image": str(images[0]), "text": None, "boxes": [BOX, NEGATIVE], "box_labels": [1, 0],
                  "threshold": 0.3})
    return found


@pytest.fixture(scope="module")
def stock(sam3_dir: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("sam3-stock")
    (folder / "cases.json").write_text(json.dumps(cases(images)))
    done = subprocess.run([stock_python(), str(ROOT / "tests" / "worker" / "sam3_stock.py"), str(sam3_dir),
                           str(folder / "cases.json"), str(folder / "out.npz")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(folder / "out.npz"))


@pytest.fixture(scope="module")
def engine(sam3_dir: Path):
    from worker.engine.families.sam3 import Sam3Engine, load_sam3

    return Sam3Engine(load_sam3(str(sam3_dir), device="cpu"), pair_chunk=3)


def key_of(case: dict):
    if case.get("boxes"):
        pos = [tuple(b) for b, k in zip(case["boxes"], case["box_labels"], strict=True) if k == 1]
        neg = [tuple(b) for b, k in zip(case["boxes"], case["box_labels"], strict=True) if k == 0]
        return BoxPrompt(tuple(pos), tuple(neg))
    return (case["text"],)


def test_roi_align_equals_torchvision(stock: dict[str, np.ndarray]) -> None:
    from worker.engine.roi_align import roi_align

    ours = roi_align(torch.from_numpy(stock["roi_align.features"]), torch.from_numpy(stock["roi_align.boxes"]), 7)
    np.testing.assert_allclose(ours, stock["roi_align"], atol=1e-5)


def test_preprocessing_matches_the_stock_processor(engine, images: list[Path], stock: dict[str, np.ndarray]) -> None:
    for n, path in enumerate(images):
        index = n * len(TEXTS)
        ours = engine.preprocess([np.asarray(Image.open(path).convert("RGB"))])[0].numpy()
        theirs = stock[f"{index}.pixel_values"]
        assert ours.shape == theirs.shape
        # both resize with antialiased bilinear and round to 8-bit levels; a level apart at most (1/255 / 0.5)
        assert np.abs(ours - theirs).max() <= 2 / 255 + 1e-6
        assert np.abs(ours - theirs).mean() < 0.002


def run_cases(engine, images, stock, *, own_pixels: bool):
    """Every case through the engine: one request per image carrying all of that image's prompts."""
    all_cases = cases(images)
    out = {}
    for img in images:
        mine = [(n, c) for n, c in enumerate(all_cases) if c["image"] == str(img)]
        by_threshold: dict[float, list] = {}
        for n, c in mine:
            by_threshold.setdefault(c["threshold"], []).append((n, c))
        arr = np.asarray(Image.open(img).convert("RGB"))
        for threshold, group in by_threshold.items():
            req = SegmentRequest(arr, [f"label{n}" for n, _ in group], threshold,
                                 phrasings=[key_of(c) for _, c in group], wanted=Wanted(soft=True, instances=True))
            pixels = None if own_pixels else torch.from_numpy(stock[f"{group[0][0]}.pixel_values"][None])
            result = engine.segment_batch([req], pixels=pixels)[0]
            for (n, _), label in zip(group, result.masks, strict=True):
                out[n] = label
    return out


def test_engine_equals_stock_on_the_same_pixels(engine, images, stock) -> None:
    """One vision pass per image, cached text, pairs batched and chunked: the stock pipeline's
    instances (scores, masks), presence and the union mask, exactly."""
    found = run_cases(engine, images, stock, own_pixels=False)
    assert len(found) == len(cases(images))
    kept = 0
    for n, label in found.items():
        scores, masks = stock[f"{n}.scores"], stock[f"{n}.masks"]
        order = np.argsort(-scores, kind="stable")
        assert label.instances is not None
        assert [round(i.score, 5) for i in label.instances] == [round(float(s), 5) for s in scores[order]]
        for inst, mask in zip(label.instances, masks[order], strict=True):
            assert (inst.mask != mask).mean() < 1e-4
        union = masks.any(axis=0) if len(masks) else np.zeros(label.mask.shape, bool)
        assert ((label.mask > 0) != union).mean() < 1e-4
        assert label.presence == pytest.approx(float(stock[f"{n}.presence"][0]), abs=1e-5)
        assert label.score == pytest.approx(float(scores.max()) if len(scores) else 0.0, abs=1e-5)
        kept += len(scores)
    # the dev model's heads are scaled so that the comparison means something: instances are kept,
    # not every query is, and masks are neither empty nor full
    assert 0 < kept < 20 * len(found)
    assert any(0.05 < label.area_fraction < 0.95 for label in found.values())


def test_engine_with_its_own_preprocessing_finds_the_same_instances(engine, images, stock) -> None:
    found = run_cases(engine, images, stock, own_pixels=True)
    for n, label in found.items():
        scores = np.sort(stock[f"{n}.scores"])[::-1]
        assert label.instances is not None
        ours = np.array([i.score for i in label.instances])
        # a pixel level of resize rounding moves scores a little; the instances kept are the same
        assert len(ours) == len(scores) or np.abs(np.concatenate([ours, scores]) - 0.5).min() < 0.01
        if len(ours) == len(scores):
            np.testing.assert_allclose(ours, scores, atol=0.01)


def test_text_past_32_positions_is_truncated(engine, images, stock) -> None:
    """Stock Sam3Model fails on it; the engine truncates, as the tokenizer's truncation does (the
    stock comparison above ran the long prompt truncated so)."""
    long_cases = [n for n, c in enumerate(cases(images)) if c["text"] == LONG]
    assert all("max_position_embeddings" in str(stock[f"{n}.crashed"]) for n in long_cases)
    arr = np.asarray(Image.open(images[0]).convert("RGB"))
    words = LONG.split()
    long, longer = engine.segment_batch([SegmentRequest(arr, ["a", "b"], 0.3, phrasings=[
        (LONG,), (LONG + " and more words " * 20,)], wanted=Wanted(instances=True))])[0].masks
    assert len(engine.loaded.tokenizer(LONG)["input_ids"]) > 32 and len(words) > 20
    assert long.presence == pytest.approx(longer.presence)
    assert [i.score for i in long.instances] == pytest.approx([i.score for i in longer.instances])


def test_a_batch_of_jobs_equals_each_job_alone(engine, images) -> None:
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    requests = [SegmentRequest(arrays[0], ["shirt", "shoe"], 0.4, wanted=Wanted(label_map=True)),
                SegmentRequest(arrays[1], ["pants", "box"], [0.5, 0.3],
                               phrasings=[("pants",), BoxPrompt(((5.0, 5.0, 50.0, 60.0),))])]
    together = engine.segment_batch(requests)
    for req, batched in zip(requests, together, strict=True):
        alone = engine.segment_batch([req])[0]
        for a, b in zip(alone.masks, batched.masks, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert (a.mask != b.mask).mean() < 1e-4
    assert together[0].label_map is not None and together[0].label_map.shape == arrays[0].shape[:2]


def test_non_finite_model_output_shows_in_the_logits_the_runner_checks(sam3_dir, images) -> None:
    """The runner fails a job whose logits are not finite (model_output_invalid): a NaN presence
    keeps no instance, so the engine must still say so."""
    from worker.engine.families.sam3 import Sam3Engine, load_sam3

    broken = Sam3Engine(load_sam3(str(sam3_dir), device="cpu"))
    with torch.no_grad():
        broken.loaded.model.detr_decoder.presence_head.layer3.bias.fill_(float("nan"))
    arr = np.asarray(Image.open(images[0]).convert("RGB"))
    result = broken.segment_batch([SegmentRequest(arr, ["shirt"], 0.5)])[0]
    assert result.masks[0].score == 0 and not torch.isfinite(result.logits).all()
