"""`clipmask eval` end to end on a synthetic dataset the test draws, with the tiny random-weight
CLIPSeg in process: the report's files, its dataset figures against the drawn shapes, and the
parquet layout read to the same answer as the folder one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli.main import main

# Each of these runs the engine over a dataset and writes a report (13 s together): they need no
# services but run with the service tests (`make test`); `make test-unit` keeps the bad-dataset check.

LABELS = {"0": "background", "1": "hat", "2": "pants", "3": "glove"}  # glove: not in the preset


def draw(i: int) -> tuple[Image.Image, np.ndarray]:
    """A 96x64 picture: a hat block on top, pants below, a glove on odd images."""
    rng = np.random.default_rng(i)
    truth = np.zeros((96, 64), dtype=np.uint8)
    truth[4:20, 16 + i:40 + i] = 1
    truth[50:90, 10:54] = 2
    if i % 2:
        truth[30:40, 2:10] = 3
    colours = np.array([[230, 230, 230], [200, 30, 30], [20, 40, 160], [240, 200, 0]], dtype=np.uint8)
    pixels = colours[truth] + rng.integers(0, 12, (96, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels), truth


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(6):
        image, truth = draw(i)
        image.save(root / "images" / f"img{i}.png")
        Image.fromarray(truth, mode="L").save(root / "masks" / f"img{i}.png")
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_eval(dataset: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["eval", str(dataset), "--preset", "human_parsing", "--model", str(model), "--out", str(out),
                 "--quiet", "--batch", "4", *extra])


def test_the_report_has_its_files_and_the_dataset_figures(folder_dataset, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_eval(folder_dataset, out, tiny_model_dir) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "hat" in printed and str(out / "index.html") in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["threshold"] == 0.4
    assert list(metrics["classes"]) == ["hat", "pants"]  # the preset's labels the dataset has, in preset order
    assert "glove" not in metrics["classes"] and "scarf" in metrics["skipped_labels"]
    truths = [draw(i)[1] for i in range(6)]
    assert metrics["classes"]["hat"]["support_pixels"] == sum(int((t == 1).sum()) for t in truths)
    assert metrics["classes"]["pants"]["support_images"] == 6
    assert metrics["dataset"]["classes"]["glove"]["images"] == 3
    for value in (metrics["miou"], metrics["mdice"], metrics["mean_boundary_f"], metrics["pixel_accuracy"],
                  metrics["fw_iou"]):
        assert 0.0 <= value <= 1.0
    for row in metrics["classes"].values():  # Dice and IoU are the same overlap: Dice = 2 IoU / (1 + IoU)
        assert row["dice"] == pytest.approx(2 * row["iou"] / (1 + row["iou"]))
        assert 0.0 <= row["boundary_f"] <= 1.0
    assert metrics["boundary_tolerance"]["pixels"] == {"min": 1.0, "median": 1.0, "max": 1.0}  # 0.0075 x 115 px
    assert "Dice" in printed and "boundary F" in printed
    for row in metrics["classes"].values():
        assert row["best_threshold"] in metrics["sweep"]["thresholds"]
        assert row["best_mask_iou"] >= row["mask_iou"]
    assert metrics["timing"]["images_per_s"] > 0

    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class,iou,dice,precision,recall,boundary_f")
    assert [r.split(",")[0] for r in rows[1:]] == ["hat", "pants"]
    page = (out / "index.html").read_text()
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == sorted(["per_class_iou.png", "threshold_sweep.png", "class_frequency.png", "spatial_priors.png",
                            "image_sizes.png"])
    for name in plots:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 150
        assert f'src="{name}"' in page
    worst = list((out / "worst").glob("*.png"))
    assert worst and all(f'src="worst/{p.name}"' in page for p in worst)


def test_the_parquet_layout_reads_to_the_same_answer(folder_dataset, tiny_model_dir, tmp_path):
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    rows = []
    for i in range(6):
        image, truth = draw(i)
        rows.append({"image": {"bytes": png(image), "path": f"img{i}.png"},
                     "mask": {"bytes": png(Image.fromarray(truth, mode="L")), "path": None}})
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([("image", cell), ("mask", cell)]))
    pq.write_table(table.slice(0, 4), data / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(4), data / "train-00001-of-00002.parquet")
    (tmp_path / "hf" / "labels.json").write_text(json.dumps(LABELS))

    assert run_eval(folder_dataset, tmp_path / "a", tiny_model_dir) == 0
    assert run_eval(tmp_path / "hf", tmp_path / "b", tiny_model_dir) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    for key in ("classes", "miou", "pixel_accuracy", "fw_iou", "sweep"):
        assert a[key] == b[key], key


def test_without_labels_json_parquet_uses_the_atr_order(tmp_path, tiny_model_dir):
    image, truth = draw(0)
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": png(image), "path": "x.png"},
                                          "mask": {"bytes": png(Image.fromarray(truth, mode="L")), "path": None}}],
                                        schema=pa.schema([("image", cell), ("mask", cell)])), tmp_path / "d.parquet")
    assert run_eval(tmp_path / "d.parquet", tmp_path / "r", tiny_model_dir) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    # ATR order: value 1 is hat, 2 hair (drawn as our "pants" block), and all 17 are evaluated
    assert len(metrics["classes"]) == 17 and list(metrics["classes"])[:3] == ["hat", "hair", "sunglasses"]
    assert metrics["classes"]["hair"]["support_pixels"] == int((truth == 2).sum())
    # ... but only the classes with ground truth are averaged, as in the folder layout
    present = ["hat", "hair"]
    assert sorted(metrics["not_averaged"]) == sorted(set(metrics["classes"]) - set(present))
    assert metrics["miou"] == pytest.approx(np.mean([metrics["classes"][c]["iou"] for c in present]))
    assert [c for c, row in metrics["classes"].items() if row["in_mean"]] == present


@pytest.mark.unit
def test_bad_datasets_get_a_clear_message(folder_dataset, tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(broken / "images" / "a.png")
    (broken / "labels.json").write_text(json.dumps(LABELS))
    assert run_eval(broken, tmp_path / "r", tiny_model_dir) == 2
    assert "no mask for 1 images, e.g. a.png" in capsys.readouterr().err

    Image.new("L", (9, 8)).save(broken / "masks" / "a.png")
    assert run_eval(broken, tmp_path / "r", tiny_model_dir) == 2
    assert "mask is 9x8, its image 8x8" in capsys.readouterr().err

    assert main(["eval", str(folder_dataset), "--prompt", "a scarf", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "none of the labels (a scarf) is in the dataset's labels" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_refine_is_evaluated_as_a_job_would_refine(folder_dataset, tiny_model_dir, tmp_path, capsys):
    """`--refine guided|matting` predicts the soft maps a job with that refine gets; the report says
    which, with boundary F beside IoU, and the maps differ from the unrefined run's."""
    plain = tmp_path / "none"
    assert run_eval(folder_dataset, plain, tiny_model_dir) == 0
    base = json.loads((plain / "metrics.json").read_text())
    assert base["refine"] == "none"
    for method in ("guided", "matting"):
        out = tmp_path / method
        assert run_eval(folder_dataset, out, tiny_model_dir, "--refine", method) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["refine"] == method and f"refine {method}" in metrics["predictor"]
        assert 0.0 <= metrics["mean_boundary_f"] <= 1.0
        assert metrics["sweep"] != base["sweep"]  # other probability maps
    capsys.readouterr()
