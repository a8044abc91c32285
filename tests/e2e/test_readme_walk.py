"""The README's walk from `sample-data` through `eval`, `finetune`, `models push` and a job naming
the model, run exactly as written (the block between its `walk` markers) in a fresh folder, against
the API over real HTTP and the session's worker. What the test supplies is what the stack would:
`.run/env` and `.run/model` as `make up` writes them, and the API's address."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from PIL import Image

from evaluation.sample_data import CLASSES
from tests.support.services import ROOT


def walk_block() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walk:.*?-->\n```bash\n(.*?)```\n<!-- /walk -->", readme, re.S)
    assert found, "README.md has no walk block"
    return found.group(1)


@pytest.mark.timeout(600)
def test_the_readmes_eval_finetune_models_walk_runs_as_written(api_url, settings, tiny_model_dir, tmp_path):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    run = tmp_path / ".run"
    run.mkdir()
    (run / "env").write_text(f"export CLIPMASK_DATABASE_URL={settings.database_url}\n")
    (run / "model").write_text(f"{tiny_model_dir}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPMASK_")}
    env.update(CLIPMASK_API_URL=api_url, CLIPMASK_CPU_DTYPE=settings.cpu_dtype)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walk_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]

    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 40
    before = json.loads((tmp_path / "before" / "metrics.json").read_text())
    after = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert (tmp_path / "before" / "index.html").is_file() and (tmp_path / "after" / "index.html").is_file()
    assert list(after["classes"]) == CLASSES
    # the walk's point: the fine-tuned decoder segments the garments better than the base did
    assert after["miou"] >= before["miou"] + 0.05, (before["miou"], after["miou"])
    masks = sorted((tmp_path / "out").rglob("*.png"))
    assert [m.stem.split("_", 1)[1] for m in masks] == CLASSES  # one mask per label of the model
    assert all(Image.open(m).size == Image.open(tmp_path / "data" / "images" / "p0000.png").size for m in masks)
