"""The native stack script: any run folder, absolute or relative; a dead or zombie process is not
taken for a live one, so `up` after a SIGKILL starts the worker again."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.support.images import make_image
from tests.support.services import ROOT, free_port, settings_env

STACK = str(ROOT / "scripts" / "stack.sh")


def _status(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([STACK, "status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=True)
    return {line.split()[0]: line for line in out.stdout.splitlines()}


@pytest.mark.unit
def test_a_zombie_or_a_gone_pid_is_not_running(tmp_path):
    env = {**os.environ, "CLIPMASK_RUN_DIR": str(tmp_path / "run")}
    pids = tmp_path / "run" / "pids"
    pids.mkdir(parents=True)
    zombie = subprocess.Popen(["true"])  # exits at once; never waited for, so it stays a zombie
    live = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{zombie.pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (pids / "worker.pid").write_text(str(zombie.pid))
        (pids / "beat.pid").write_text(str(live.pid))
        (pids / "api.pid").write_text("999999999")
        status = _status(env)
        assert status["worker"] == "worker not running"  # kill -0 would have said alive
        assert status["beat"] == f"beat running (pid {live.pid})"
        assert status["api"] == "api not running"
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def run_one_job(api: str, headers: dict[str, str], body: dict) -> dict:
    """POST a job to the stack at `api` and poll it until it has ended (60 s at most)."""
    job = requests.post(f"http://{api}/v1/jobs", json=body, headers=headers, timeout=10).json()
    deadline = time.monotonic() + 60
    while (job := requests.get(f"http://{api}/v1/jobs/{job['id']}", headers=headers, timeout=10).json()
           )["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return job


def test_an_absolute_run_folder_and_a_restart_after_sigkill(settings, storage, tenant, image_server, tmp_path):
    run = tmp_path / "abs-run"  # absolute: `$PWD//abs/path` broke every request before
    api = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **settings_env(settings), "CLIPMASK_RUN_DIR": str(run), "CLIPMASK_API_BIND": api,
           "CLIPMASK_FLOWER_PORT": str(free_port()), "CLIPMASK_WORKER_CONCURRENCY": "2",
           "CLIPMASK_INTERACTIVE_QUEUE": f"{settings.interactive_queue}-stack",
           "CLIPMASK_BULK_QUEUE": f"{settings.bulk_queue}-stack",
           "CLIPMASK_EVENTS_QUEUE": f"{settings.events_queue}-stack",
           "CLIPMASK_WORKER_METRICS_PORT": "0", "CLIPMASK_API_WORKERS": "1"}
    try:
        up = subprocess.run([STACK, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert requests.get(f"http://{api}/healthz", timeout=5).status_code == 200
        assert requests.get(f"http://{api}/metrics", timeout=5).status_code == 200  # the metrics folder exists
        assert (run / "logs" / "api.log").exists() and (run / "prometheus").is_dir()

        first = int((run / "pids" / "worker.pid").read_text())
        os.killpg(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "not running" not in _status(env)["worker"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        again = subprocess.run([STACK, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"worker (pid {first}) is not running; starting it again" in again.stdout
        assert "api already running" in again.stdout
        assert _status(env)["worker"].startswith("worker running")

        url = image_server.add("/stack.jpg", make_image(24, 24))
        job = run_one_job(api, tenant.headers, {"image_url": url, "prompts": ["a"]})
        assert job["status"] == "succeeded"
    finally:
        subprocess.run([STACK, "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (SeaweedFS takes the S3 port and the seven after it)."""
    import socket

    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


def test_masks_outlive_a_restart_of_the_stack(settings, tenant, image_server, tmp_path):
    """`up`, a job, `down`, `up`: the stack's own S3 server (SeaweedFS, data under the run folder)
    serves the job's mask with the same bytes, and no moto process is part of the stack."""
    run = tmp_path / "persist-run"
    api = f"127.0.0.1:{free_port()}"
    s3_port = free_port_run(8)
    env = {**os.environ, **settings_env(settings), "CLIPMASK_RUN_DIR": str(run), "CLIPMASK_API_BIND": api,
           "CLIPMASK_FLOWER_PORT": str(free_port()), "CLIPMASK_WORKER_CONCURRENCY": "2",
           "CLIPMASK_INTERACTIVE_QUEUE": f"{settings.interactive_queue}-persist",
           "CLIPMASK_BULK_QUEUE": f"{settings.bulk_queue}-persist",
           "CLIPMASK_EVENTS_QUEUE": f"{settings.events_queue}-persist",
           "CLIPMASK_WORKER_METRICS_PORT": "0", "CLIPMASK_API_WORKERS": "1",
           "CLIPMASK_S3_PORT": str(s3_port), "CLIPMASK_S3_BUCKET": f"persist-{settings.s3_bucket}"}
    for name in ("CLIPMASK_S3_ENDPOINT_URL", "CLIPMASK_S3_ACCESS_KEY_ID", "CLIPMASK_S3_SECRET_ACCESS_KEY"):
        env.pop(name, None)  # the stack's own server, with its default keys
    headers = {**tenant.headers}
    try:
        up = subprocess.run([STACK, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        server = int((run / "pids" / "s3.pid").read_text())
        assert "weed" in open(f"/proc/{server}/cmdline").read()  # `clipmask dev-s3` execs it; S3 answered since
        url = image_server.add("/persist.jpg", make_image(40, 30))
        job = run_one_job(api, headers, {"image_url": url, "prompts": ["a", "b"]})
        assert job["status"] == "succeeded", job
        masks = [requests.get(r["mask_url"], timeout=10).content for r in job["results"]]
        assert all(m.startswith(b"\x89PNG") for m in masks)

        down = subprocess.run([STACK, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "s3 stopped" in down.stdout
        with pytest.raises(requests.ConnectionError):
            requests.get(job["results"][0]["mask_url"], timeout=5)  # the server is really gone

        again = subprocess.run([STACK, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        after = requests.get(f"http://{api}/v1/jobs/{job['id']}", headers=headers, timeout=10).json()
        assert [requests.get(r["mask_url"], timeout=10).content for r in after["results"]] == masks
        stack_pids = [int((run / "pids" / f"{name}.pid").read_text()) for name in ("s3", "api", "worker")]
        assert not any("moto" in open(f"/proc/{pid}/cmdline").read() for pid in stack_pids)
    finally:
        subprocess.run([STACK, "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
