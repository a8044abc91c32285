"""The `clipmask` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import select

from shared.tables import ApiKey
from shared.tenants import hash_key
from tests.support.services import ROOT, settings_env


def clipmask(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tenant_create_prints_credentials_and_stores_only_a_hash(settings, sessions, client):
    out = clipmask(settings, "tenant", "create", "Acme Catalogs")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert set(created) == {"tenant_id", "api_key", "webhook_secret"}
    assert created["webhook_secret"].startswith("whsec_")
    with sessions() as session:
        keys = session.execute(select(ApiKey).where(ApiKey.tenant_id == created["tenant_id"])).scalars().all()
    assert [k.key_hash for k in keys] == [hash_key(created["api_key"])]
    assert created["api_key"] not in {k.key_hash for k in keys}
    # and the key works against the API
    resp = client.get("/v1/jobs", headers={"Authorization": f"Bearer {created['api_key']}"})
    assert resp.status_code == 200 and resp.get_json()["data"] == []


def test_dev_model_is_loadable_by_from_pretrained(settings, tmp_path):
    out = clipmask(settings, "dev-model", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from worker.engine.loading import load_clipseg

    model = CLIPSegForImageSegmentation.from_pretrained(tmp_path / "m")
    assert model.config.extract_layers == [0, 1, 2]
    assert CLIPSegProcessor.from_pretrained(tmp_path / "m").tokenizer("a shirt")["input_ids"]
    loaded = load_clipseg(str(tmp_path / "m"), device="cpu")
    assert loaded.preprocessing.height == 96


def test_migrate_is_idempotent(settings):
    assert clipmask(settings, "migrate").returncode == 0
    assert clipmask(settings, "migrate").returncode == 0


def test_refine_sharpens_a_coarse_mask_to_the_photos_size(settings, tmp_path):
    """`clipmask refine IMAGE MASK`: a small soft mask from any model comes back at the photo's size
    with its outline on the photo's edge; a colour "mask" is refused with a clear message."""
    import numpy as np
    from PIL import Image

    photo = np.zeros((360, 640, 3), dtype=np.uint8)
    photo[:, 320:] = (230, 60, 40)  # a red garment from column 320
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    coarse = np.clip((np.arange(40) - 20) * 60 + 128, 0, 255).astype(np.uint8)  # soft, 8 px off at full size
    Image.fromarray(np.tile(coarse, (20, 1))).save(tmp_path / "coarse.png")
    for method in ("guided", "matting"):
        out = clipmask(settings, "refine", str(tmp_path / "photo.jpg"), str(tmp_path / "coarse.png"),
                       "--method", method, "--out", str(tmp_path / f"{method}.png"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["method"] == method
        with Image.open(tmp_path / f"{method}.png") as refined:
            assert (refined.mode, refined.size) == ("L", (640, 360))
            row = np.asarray(refined)[180]
        assert abs(int(np.argmax(row >= 128)) - 320) <= 3
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "colour.png")
    out = clipmask(settings, "refine", str(tmp_path / "photo.jpg"), str(tmp_path / "colour.png"), "--out",
                   str(tmp_path / "x.png"))
    assert out.returncode == 2 and "8-bit grayscale" in out.stderr
