"""`clipmask eval --api`: the same synthetic dataset scored through a running deployment (real
API, worker, Postgres, Redis, S3) agrees with the engine in process."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from api import create_app
from cli.main import main
from tests.support.services import serving


@pytest.mark.parametrize("cpu_dtype", ["fp32", "bf16"])
def test_eval_against_a_deployment_agrees_with_the_engine_in_process(settings, storage, tenant, tiny_model_dir,
                                                                     tmp_path, monkeypatch, cpu_dtype):
    """A deployment whose worker runs `cpu_dtype` (CLIPMASK_CPU_DTYPE; `auto` picks bf16 on a CPU with
    native bf16, fp32 elsewhere) and eval in process with the same environment agree: eval loads the
    engine as the worker does, whatever kind of CPU runs the test (bf16 is emulated, slower, on one
    without it, and still correct)."""
    import uuid

    from tests.support.services import private_queues, start_worker, stop_process

    deployment = private_queues(settings, f"eval-{cpu_dtype}-{uuid.uuid4().hex[:6]}", cpu_dtype=cpu_dtype)
    monkeypatch.setenv("CLIPMASK_CPU_DTYPE", cpu_dtype)
    worker = start_worker(deployment, tmp_path / "worker.log", name=f"eval-{cpu_dtype}")
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        pixels = Image.new("RGB", (48, 64), (30 * i, 200, 90))
        truth = Image.new("L", (48, 64), 0)
        truth.paste(1, (4 + i, 4, 30, 20))
        truth.paste(2, (8, 30, 40, 60))
        pixels.paste((220, 20, 20), (4 + i, 4, 30, 20))
        pixels.paste((20, 20, 180), (8, 30, 40, 60))
        pixels.save(root / "images" / f"{i}.png")
        truth.save(root / "masks" / f"{i}.png")
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "hat", "2": "pants"}))

    local = ["eval", str(root), "--preset", "human_parsing", "--quiet", "--model", str(tiny_model_dir)]
    try:
        assert main([*local, "--out", str(tmp_path / "local")]) == 0
        monkeypatch.setenv("CLIPMASK_API_KEY", tenant.api_key)
        with serving(create_app(deployment)) as url:
            assert main(["eval", str(root), "--preset", "human_parsing", "--quiet", "--api", url,
                         "--out", str(tmp_path / "remote")]) == 0
    finally:
        stop_process(worker)
    here, there = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "remote"))
    assert there["predictor"] == f"the deployment at {url}" and there["images"] == 3
    assert here["predictor"].endswith({"fp32": "(float32)", "bf16": "(bfloat16)"}[cpu_dtype])
    for name in ("hat", "pants"):
        for key in ("iou", "mask_iou", "precision", "recall"):
            assert there["classes"][name][key] == pytest.approx(here["classes"][name][key], abs=0.01), (name, key)
        assert there["classes"][name]["support_pixels"] == here["classes"][name]["support_pixels"]


@pytest.mark.unit
def test_eval_api_without_a_key_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPMASK_API_KEY", raising=False)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")
    Image.new("L", (8, 8)).save(root / "masks" / "a.png")
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "hat"}))
    assert main(["eval", str(root), "--preset", "human_parsing", "--api", "http://127.0.0.1:9"]) == 2
    assert "--api needs --api-key or CLIPMASK_API_KEY" in capsys.readouterr().err
