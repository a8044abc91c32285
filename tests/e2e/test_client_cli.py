"""The Python client and the `clipmask submit` / `clipmask batch` commands against the API served
over real HTTP and the session's worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import func, select

from client import Clipmask, ClipmaskError
from shared.tables import Batch
from tests.support.images import make_image
from tests.support.services import ROOT


def cli(args: list[str], api_url: str, key: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPMASK_API_URL": api_url, "CLIPMASK_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, **kwargs)


def test_client_covers_jobs_with_typed_results_and_coded_errors(api_url, tenant, tmp_path):
    image = tmp_path / "look.jpg"
    image.write_bytes(make_image(64, 48))
    with Clipmask(api_url, tenant.api_key) as cm:
        job = cm.create_job(image, ["shirt", "pants"], metadata={"sku": "9"})
        assert job.status == "queued" and job.input["upload"]["filename"] == "look.jpg"
        done = cm.wait(job.id, timeout=60)
        assert done.status == "succeeded" and [r.prompt for r in done.results] == ["shirt", "pants"]
        assert done.attempts == 1 and job.attempts == 0  # taken once; 0 when just accepted
        mask = cm.download(done.results[0].mask_url, tmp_path / "m.png")
        assert Image.open(mask).size == (64, 48)
        assert any(j.id == job.id for j in cm.list_jobs(status="succeeded").data)

        with pytest.raises(ClipmaskError) as bad:
            cm.create_job(image, [])
        assert bad.value.status == 422 and bad.value.code == "invalid_prompts"
        with pytest.raises(ClipmaskError) as missing:
            cm.get_job(str(uuid.uuid4()))
        assert missing.value.code == "not_found"
        with pytest.raises(ClipmaskError) as conflict:
            cm.cancel_job(job.id)
        assert conflict.value.status == 409 and conflict.value.code == "job_not_cancelable"
    with Clipmask(api_url, "cm_wrong") as wrong, pytest.raises(ClipmaskError) as denied:
        wrong.list_jobs()
    assert denied.value.status == 401 and denied.value.code == "unauthorized"


def test_client_batches_and_deliveries(api_url, tenant, image_server):
    url = image_server.add(f"/c-{uuid.uuid4().hex[:6]}.jpg", make_image(40, 30))
    with Clipmask(api_url, tenant.api_key) as cm:
        batch = cm.create_batch(items=[{"image_url": url}, {"image_url": url}], prompts=["shirt"],
                                webhook_url="https://hooks.invalid/x", webhook_events=["batch.completed"])
        assert batch.counts["total"] == 2
        deadline = time.monotonic() + 60
        while not (batch := cm.get_batch(batch.id)).results_url:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert batch.status == "completed" and batch.counts["succeeded"] == 2
        assert len(list(cm.iter_batch_jobs(batch.id))) == 2
        deliveries = cm.list_webhook_deliveries(batch_id=batch.id).data
        assert [d.event_type for d in deliveries] == ["batch.completed"]


def test_cli_submit_downloads_the_masks(api_url, tenant, tmp_path):
    image = tmp_path / "model-01.jpg"
    image.write_bytes(make_image(50, 40))
    out = tmp_path / "out"
    done = cli(["submit", str(image), "--prompt", "shirt", "--prompt", "pants", "--out", str(out)], api_url,
               tenant.api_key)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["model-01/00_shirt.png", "model-01/01_pants.png"]
    assert Image.open(out / "model-01/00_shirt.png").size == (50, 40)


def test_cli_batch_is_resumable_without_resubmitting(api_url, tenant, sessions, image_server, tmp_path):
    urls = [image_server.add(f"/cat-{uuid.uuid4().hex[:6]}-{i}.jpg", make_image(36 + i, 30)) for i in range(5)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("image_url,sku\n" + "".join(f"{u},SKU{i}\n" for i, u in enumerate(urls)))
    out = tmp_path / "masks"
    env = {**os.environ, "CLIPMASK_API_URL": api_url, "CLIPMASK_API_KEY": tenant.api_key}
    first = subprocess.Popen([sys.executable, "-m", "cli.main", "batch", str(catalog), "--out", str(out),
                              "--prompt", "shirt"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / ".clipmask-batch.json").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # interrupted right after submitting
    first.wait()

    again = cli(["batch", str(catalog), "--out", str(out), "--prompt", "shirt"], api_url, tenant.api_key)
    assert again.returncode == 0, again.stderr
    assert "resuming batch" in again.stderr and "5 succeeded" in again.stderr
    assert "batch:" in again.stderr  # the progress bar
    with sessions() as session:
        assert session.execute(select(func.count()).select_from(Batch).where(
            Batch.tenant_id == tenant.tenant_id)).scalar_one() == 1
    for row in range(5):
        mask = Image.open(out / f"{row:06d}" / "00_shirt.png")
        assert mask.size == (36 + row, 30)  # row order kept: each catalog row has its own width
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    assert (out / "failed.jsonl").read_text() == ""

    third = cli(["batch", str(catalog), "--out", str(out), "--prompt", "shirt"], api_url, tenant.api_key)
    assert third.returncode == 0 and "resuming batch" in third.stderr  # done already: no new batch
    with sessions() as session:
        assert session.execute(select(func.count()).select_from(Batch).where(
            Batch.tenant_id == tenant.tenant_id)).scalar_one() == 1


def test_cli_submit_with_a_preset_writes_every_output_next_to_the_masks(api_url, tenant, tmp_path):
    image = tmp_path / "look-7.jpg"
    image.write_bytes(make_image(60, 80))
    out = tmp_path / "out"
    done = cli(["submit", str(image), "--preset", "clothing", "--output", "mask", "--output", "cutout",
                "--output", "rle", "--output", "label_map", "--output", "overlay", "--out", str(out)],
               api_url, tenant.api_key)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["preset"] == "clothing"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    labels = ["upper_body", "lower_body", "full_body"]
    for i, label in enumerate(labels):
        assert f"look-7/{i:02d}_{label}.png" in files and f"look-7/{i:02d}_{label}.rle.json" in files
        cut = f"look-7/{i:02d}_{label}.cutout.png"
        assert (cut in files) == (job["results"][i]["bbox"] is not None)
        rle = json.loads((out / f"look-7/{i:02d}_{label}.rle.json").read_text())
        assert rle == job["results"][i]["rle"]
    assert {"look-7/label_map.png", "look-7/overlay.jpg"} <= files
    assert Image.open(out / "look-7/label_map.png").mode == "P"
    assert Image.open(out / "look-7/overlay.jpg").size == (60, 80)


def test_client_presets_and_waiting_create(api_url, tenant, tmp_path):
    with Clipmask(api_url, tenant.api_key) as cm:
        assert [p["id"] for p in cm.list_presets()][:2] == ["clothing", "human_parsing"]
        made = cm.create_preset("tops", [{"name": "blouse", "prompts": ["a blouse", "a women's top"]}],
                                idempotency_key="tops-once")
        # a retry whose first answer was lost: the same key replays the 201, not 409 preset_exists
        assert cm.create_preset("tops", [{"name": "blouse", "prompts": ["a blouse", "a women's top"]}],
                                idempotency_key="tops-once") == made
        job = cm.create_job(make_image(40, 40), preset="tops", prompts=["belt"], outputs=["soft", "rle"], wait=30)
        assert job.status == "succeeded"  # answered once final, no polling
        assert [(r.prompt, r.source) for r in job.results] == [("blouse", "preset"), ("belt", "text")]
        assert job.results[0].soft_url and job.results[0].rle and job.results[0].mask_url is None
        assert job.model and job.model["revision"]
        cm.delete_preset("tops")
        with pytest.raises(ClipmaskError) as info:
            cm.delete_preset("clothing")
        assert info.value.code == "preset_read_only"


def test_cli_image_prompts_embeddings_and_search_table(api_url, make_tenant, tmp_path):
    tenant = make_tenant()
    example = tmp_path / "gown.png"
    example.write_bytes(make_image(32, 48, fmt="PNG"))
    shots = []
    for i in range(3):
        image = tmp_path / f"item-{i}.jpg"
        image.write_bytes(make_image(50 + 10 * i, 60))
        done = cli(["submit", str(image), "--prompt", "dress", "--image-prompt", f"gown={example}",
                    "--embed", "image", "--embed", "masks", "--wait"], api_url, tenant.api_key)
        assert done.returncode == 0, done.stderr
        shots.append(json.loads(done.stdout))
    job = shots[0]
    assert [(r["prompt"], r["source"]) for r in job["results"]] == [("dress", "text"), ("gown", "image")]
    assert job["embed"] == ["image", "masks"] and job["embedding"]
    table = cli(["search", "--like", job["id"], "--limit", "3"], api_url, tenant.api_key)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["#", "score", "job"]
    assert lines[2].split()[2] == job["id"] and float(lines[2].split()[1]) >= 0.99  # itself, first
    assert len(lines) == 2 + 3
    by_text = cli(["search", "--text", "a red dress", "--json"], api_url, tenant.api_key)
    hits = json.loads(by_text.stdout)
    assert {h["job_id"] for h in hits} == {s["id"] for s in shots}
    by_image = cli(["search", "--image", str(tmp_path / "item-2.jpg"), "--json"], api_url, tenant.api_key)
    assert json.loads(by_image.stdout)[0]["job_id"] == shots[2]["id"]
    bad = cli(["search", "--text", "x", "--limit", "0"], api_url, tenant.api_key)
    assert bad.returncode == 1 and "invalid_limit" in bad.stderr
