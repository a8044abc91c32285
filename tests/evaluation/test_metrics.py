"""The metrics against values computed by hand on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.datasets import IGNORE
from evaluation.scoring import SWEEP, DatasetStats, Scores, label_map

pytestmark = pytest.mark.unit


def soft_of(*planes: np.ndarray) -> np.ndarray:
    return np.stack([p.astype(np.uint8) for p in planes])


def test_a_perfect_predictor_scores_one_everywhere():
    truth = np.zeros((8, 10), dtype=np.uint8)
    truth[:4, :5] = 1
    truth[5:, 2:] = 2
    scores = Scores(["hat", "pants"], threshold=0.4)
    scores.add("a", truth, soft_of((truth == 1) * 255, (truth == 2) * 255))
    m = scores.summary()
    assert m["miou"] == 1.0 and m["miou_with_background"] == 1.0
    assert m["pixel_accuracy"] == 1.0 and m["fw_iou"] == pytest.approx(1.0)
    for name, support in (("hat", 20), ("pants", 24)):
        row = m["classes"][name]
        assert (row["iou"], row["precision"], row["recall"], row["mask_iou"]) == (1.0, 1.0, 1.0, 1.0)
        assert row["support_pixels"] == support and row["support_images"] == 1
        assert m["sweep"]["mask_iou"][name] == [1.0] * len(SWEEP)


def test_a_known_overlap_gives_its_known_iou():
    # 10x10: the truth is columns 0-5 (60 px), the prediction columns 3-9 (70 px): 30 in common,
    # 100 in the union. Background: truth columns 6-9 (40 px), predicted columns 0-2 (30 px), none shared.
    truth = np.zeros((10, 10), dtype=np.uint8)
    truth[:, :6] = 1
    pred = np.zeros((10, 10), dtype=np.uint8)
    pred[:, 3:] = 255
    m = Scores(["dress"], threshold=0.5)
    m.add("x", truth, soft_of(pred))
    s = m.summary()
    row = s["classes"]["dress"]
    assert row["iou"] == pytest.approx(0.3)
    assert row["precision"] == pytest.approx(30 / 70) and row["recall"] == pytest.approx(30 / 60)
    assert row["mask_iou"] == pytest.approx(0.3)
    assert row["dice"] == row["mask_dice"] == pytest.approx(2 * 30 / (60 + 70))
    assert s["mdice"] == pytest.approx(60 / 130)
    assert s["background_iou"] == 0.0
    assert s["miou"] == pytest.approx(0.3) and s["miou_with_background"] == pytest.approx(0.15)
    assert s["pixel_accuracy"] == pytest.approx(0.3)
    assert s["fw_iou"] == pytest.approx(0.6 * 0.3 + 0.4 * 0.0)


def test_the_threshold_sweep_finds_the_plateau_and_picks_its_middle():
    # truth: the left half; p = 200/255 there and 100/255 on the right half
    truth = np.zeros((4, 8), dtype=np.uint8)
    truth[:, :4] = 1
    soft = np.full((4, 8), 100, dtype=np.uint8)
    soft[:, :4] = 200
    scores = Scores(["skirt"], threshold=0.3)
    scores.add("x", truth, soft_of(soft))
    s = scores.summary()
    curve = dict(zip(SWEEP, s["sweep"]["mask_iou"]["skirt"], strict=True))
    # t <= 100/255 keeps everything (IoU 16/32); 100/255 < t <= 200/255 exactly the truth; above, nothing
    assert curve[0.05] == curve[0.35] == 0.5
    assert all(curve[t] == 1.0 for t in SWEEP if 0.4 <= t <= 0.75)
    assert curve[0.8] == curve[0.95] == 0.0
    assert s["classes"]["skirt"]["mask_iou"] == 0.5  # at the job's threshold 0.3
    assert s["classes"]["skirt"]["best_mask_iou"] == 1.0
    assert s["classes"]["skirt"]["best_threshold"] == 0.6  # the middle of 0.40..0.75


def test_ignored_pixels_do_not_count_and_unasked_labels_are_background():
    truth = np.zeros((2, 4), dtype=np.uint8)
    truth[0, :2] = 1
    truth[0, 2:] = IGNORE  # predicted as the class, but ignored
    pred = np.zeros((2, 4), dtype=np.uint8)
    pred[0, :] = 255
    scores = Scores(["hat"], threshold=0.5)
    scores.add("x", truth, soft_of(pred))
    s = scores.summary()
    assert s["classes"]["hat"]["iou"] == 1.0 and s["pixel_accuracy"] == 1.0
    assert int(scores.confusion.sum()) == 6


def test_the_label_map_takes_the_most_probable_label_reaching_the_threshold():
    a = np.array([[200, 90, 100, 10]], dtype=np.uint8)
    b = np.array([[100, 90, 100, 20]], dtype=np.uint8)
    assert label_map(np.stack([a, b]), 0.3).tolist() == [[1, 1, 1, 0]]  # ties keep the earlier label
    assert label_map(np.stack([b, a]), 0.3).tolist() == [[2, 1, 1, 0]]


def test_the_worst_images_come_worst_first():
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[:2] = 1
    scores = Scores(["hat"], threshold=0.5, worst_k=2)
    good = (truth == 1) * 255
    half = np.zeros((4, 4))
    half[:1] = 255  # IoU 0.5
    none = np.zeros((4, 4))  # IoU 0
    for name, soft in (("good", good), ("half", half), ("none", none)):
        scores.add(name, truth, soft_of(soft))
    assert [(w.name, w.iou) for w in scores.worst(0)] == [("none", 0.0), ("half", 0.5)]
    assert scores.summary()["classes"]["hat"]["worst_images"][0] == {"image": "none", "mask_iou": 0.0}


def test_dataset_statistics_count_pixels_images_and_where_classes_lie():
    stats = DatasetStats({0: "background", 1: "hat", 2: "pants"})
    top_left = np.zeros((64, 128), dtype=np.uint8)
    top_left[:32, :64] = 1
    stats.add(top_left)
    stats.add(np.zeros((32, 32), dtype=np.uint8))
    s = stats.summary()
    assert s["classes"]["hat"] == {"value": 1, "pixels": 32 * 64, "pixel_fraction": 2048 / (64 * 128 + 1024),
                                   "images": 1}
    assert s["classes"]["pants"]["images"] == 0 and s["classes"]["background"]["images"] == 2
    prior = stats.prior_of(1)
    assert prior[:32, :32].min() == 1.0 and prior[32:, :].max() == 0.0 and prior[:, 32:].max() == 0.0
    assert s["aspect_ratio"] == {"min": 1.0, "median": 1.5, "max": 2.0}


def test_a_class_without_ground_truth_is_not_averaged_but_its_false_positives_count():
    truth = np.zeros((10, 10), dtype=np.uint8)
    truth[:, :5] = 1  # hat only; no belt anywhere
    belt = np.zeros((10, 10), dtype=np.uint8)
    belt[:2, 5:] = 255  # 10 px of belt predicted on background
    scores = Scores(["hat", "belt"], threshold=0.5)
    scores.add("x", truth, soft_of((truth == 1) * 255, belt))
    m = scores.summary()
    assert m["classes"]["belt"]["iou"] == 0.0 and m["classes"]["belt"]["predicted_pixels"] == 10
    assert m["classes"]["belt"]["in_mean"] is False and m["not_averaged"] == ["belt"]
    assert m["miou"] == 1.0 and m["mdice"] == 1.0  # hat alone
    assert m["pixel_accuracy"] == pytest.approx(90 / 100)  # the belt's false positives still cost
    assert m["miou_with_background"] == pytest.approx((1.0 + 40 / 50) / 2)


def test_the_label_map_competes_every_label_the_job_has():
    """A preset label the dataset does not have still takes the pixels it wins in the label map
    (background for scoring), as the service's label_map gives them; each label's own mask is its row."""
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[:, :2] = 1
    hat = np.full((4, 4), 150, dtype=np.uint8)
    hat[:, :2] = 200
    scarf = np.zeros((4, 4), dtype=np.uint8)
    scarf[:, :1] = 255  # wins column 0 over the hat
    scores = Scores(["hat"], threshold=0.5, columns=[1], labels=2)
    scores.add("x", truth, soft_of(scarf, hat))
    m = scores.summary()
    assert m["classes"]["hat"]["iou"] == pytest.approx(4 / 16)  # column 1 only: columns 2-3 are hat too
    assert m["classes"]["hat"]["mask_iou"] == pytest.approx(8 / 16)  # its own mask: columns 0-3
    with pytest.raises(ValueError):
        scores.add("y", truth, soft_of(hat))  # one plane for a two-label job


def test_boundary_f_matches_within_the_tolerance():
    truth = np.zeros((40, 40), dtype=np.uint8)
    truth[10:30, 10:30] = 1
    for shift, tolerance, expected in ((0, 0.0075, 1.0), (1, 0.0075, 1.0), (4, 0.0075, 0.0)):
        pred = np.zeros((40, 40), dtype=np.uint8)
        pred[10 + shift:30 + shift, 10 + shift:30 + shift] = 255
        scores = Scores(["box"], threshold=0.5, boundary_tolerance=tolerance)  # 0.0075 x 56.6 px: 1 px
        scores.add("x", truth, soft_of(pred))
        row = scores.summary()["classes"]["box"]
        if expected == 0.0:  # 4 px off: only the boundary pixels where the shifted edges cross match
            assert row["boundary_f"] < 0.2
        else:
            assert row["boundary_f"] == pytest.approx(expected)
    wider = Scores(["box"], threshold=0.5, boundary_tolerance=0.1)  # 6 px
    wider.add("x", truth, soft_of(pred))
    assert wider.summary()["classes"]["box"]["boundary_f"] == pytest.approx(1.0)
