"""`clipmask finetune` on a synthetic set the tiny random-weight CLIPSeg can learn (evaluation/
sample_data.py), then `clipmask eval --model DIR` on the folder it wrote: the decoder learns, the
folder is what the format says, and eval scores it through the engine as a worker would run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from evaluation.finetune import mirror_lookup, variant
from evaluation.sample_data import CLASSES, person, write_folder
from shared.modelfile import MANIFEST, WEIGHTS
from worker.engine.finetuned import InvalidModel, read_model_folder

# Training runs here: these need no services but take ~17 s, so they run with the service tests
# (`make test`), not `make test-unit`; the augmentation's test is a unit test.


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("garments"), 32)


@pytest.fixture(scope="module")
def tuned(garments, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "model"
    assert main(["finetune", str(garments), "--preset", "human_parsing", "--model", str(tiny_model_dir),
                 "--out", str(out), "--epochs", "10", "--lr", "5e-3", "--val-fraction", "0.25", "--batch-size", "4",
                 "--quiet"]) == 0
    return out


def test_fine_tuning_beats_the_base_on_the_validation_images(tuned, tiny_model_dir):
    manifest = json.loads((tuned / MANIFEST).read_text())
    before = manifest["metrics"]["validation_before"]["miou"]
    after = manifest["metrics"]["validation_after"]["miou"]
    assert after >= before + 0.05, (before, after)
    assert manifest["format"] == 1 and manifest["base"]["id"] == str(Path(tiny_model_dir).resolve())
    assert [label["name"] for label in manifest["labels"]] == CLASSES  # the preset's labels the data has
    assert all(0 < label["threshold"] < 1 for label in manifest["labels"])
    training = manifest["training"]
    assert (training["train"], training["validation"]) == (24, 8) and training["train_images_per_s"] > 0
    assert len(manifest["history"]["val_miou"]) == training["epochs_run"] <= 10
    assert (tuned / "report" / "index.html").is_file() and (tuned / "report" / "curves.png").is_file()
    folder = read_model_folder(tuned)
    assert folder.label_embeddings is None and all(name.startswith("decoder.") for name in folder.decoder)


def test_eval_of_the_folder_scores_it_as_the_worker_runs_it(tuned, garments, tiny_model_dir, tmp_path):
    base = ["eval", str(garments), "--preset", "human_parsing", "--quiet", "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "base")]
    assert main(base) == 0
    assert main(["eval", str(garments), "--model", str(tuned), "--quiet", "--out", str(tmp_path / "tuned"),
                 "--calibrate", str(tmp_path / "cal.json")]) == 0
    before, after = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("base", "tuned"))
    assert "fine-tuned on" in after["predictor"] and list(after["classes"]) == CLASSES  # the folder's own labels
    assert after["miou"] > before["miou"] + 0.05
    calibrated = json.loads((tmp_path / "cal.json").read_text())
    assert [row["name"] for row in calibrated["labels"]] == CLASSES
    assert all(row["threshold"] == after["classes"][row["name"]]["best_threshold"] for row in calibrated["labels"])


def test_a_broken_model_folder_is_refused_with_its_reason(tuned, garments, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((tuned / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    (broken / WEIGHTS).write_bytes((tuned / WEIGHTS).read_bytes())
    with pytest.raises(InvalidModel, match="format 99"):
        read_model_folder(broken)
    assert main(["eval", str(garments), "--model", str(broken), "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "format 99 is not 1" in capsys.readouterr().err
    (broken / MANIFEST).write_text(json.dumps(manifest))
    (broken / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(InvalidModel, match="weights: not a safetensors file"):
        read_model_folder(broken)


@pytest.mark.unit
def test_mirroring_swaps_left_and_right_labels():
    import random

    lookup = mirror_lookup(CLASSES)
    assert lookup[CLASSES.index("left_shoe") + 1] == CLASSES.index("right_shoe") + 1
    assert lookup[CLASSES.index("hat") + 1] == CLASSES.index("hat") + 1
    image, truth = person(3)
    flipped, flipped_truth = variant(image, truth, 1, random.Random(0), lookup)
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    left, right = CLASSES.index("left_shoe") + 1, CLASSES.index("right_shoe") + 1
    assert np.array_equal(flipped_truth == left, (truth == right)[:, ::-1])
    cropped, cropped_truth = variant(image, truth, 2, random.Random(1), lookup)
    assert isinstance(cropped, Image.Image) and cropped.size == cropped_truth.shape[::-1]
    for value in range(1, len(CLASSES) + 1):  # a crop keeps every labelled pixel
        assert (cropped_truth == value).sum() + (cropped_truth == lookup[value]).sum() >= (truth == value).sum()


def test_prompt_tuning_saves_learned_label_embeddings_that_eval_uses(garments, tiny_model_dir, tmp_path):
    out = tmp_path / "tuned-prompts"
    assert main(["finetune", str(garments), "--preset", "human_parsing", "--model", str(tiny_model_dir),
                 "--out", str(out), "--epochs", "3", "--lr", "5e-3", "--val-fraction", "0.25", "--batch-size", "4",
                 "--prompt-tuning", "--quiet"]) == 0
    folder = read_model_folder(out)
    assert folder.label_embeddings is not None and folder.label_embeddings.shape[0] == len(CLASSES)
    assert json.loads((out / MANIFEST).read_text())["prompt_tuning"] is True
    # eval answers each label with its learned embedding: the folder's labels, scored without error
    assert main(["eval", str(garments), "--model", str(out), "--quiet", "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert list(metrics["classes"]) == CLASSES


def test_ctrl_c_keeps_the_best_checkpoint_so_far(garments, tiny_model_dir, tmp_path, monkeypatch):
    from evaluation import finetune

    real_loss = finetune.Trainer.loss
    calls = [0]

    def interrupted(self, *args):  # the fault: the user presses Ctrl-C during the third epoch
        calls[0] += 1
        if calls[0] == 2 * 24 + 3:  # 24 steps an epoch: 24 images x 4 variants, 4 a step
            raise KeyboardInterrupt
        return real_loss(self, *args)

    monkeypatch.setattr(finetune.Trainer, "loss", interrupted)
    out = tmp_path / "interrupted"
    assert main(["finetune", str(garments), "--preset", "human_parsing", "--model", str(tiny_model_dir),
                 "--out", str(out), "--epochs", "10", "--lr", "5e-3", "--val-fraction", "0.25", "--batch-size", "4",
                 "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["stopped"].startswith("interrupted") and manifest["training"]["epochs_run"] == 2
    assert manifest["training"]["best_epoch"] in (1, 2)
    best = max(v for v in manifest["history"]["val_miou"] if v is not None)
    assert manifest["metrics"]["validation_after"]["miou"] == pytest.approx(best)  # the best epoch's weights
