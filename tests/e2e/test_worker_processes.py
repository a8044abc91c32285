"""`python -m worker.processes`: CLIPMASK_WORKER_PROCESSES real Celery worker processes on one host,
sharing the queues, each one started again when it dies, all stopped by one SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from api import create_app
from shared.queue import make_celery
from tests.support.images import make_image
from tests.support.services import ROOT, private_queues, settings_env, worker_queues


def _ready(log_path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while log_path.read_bytes().count(b" ready.") < count:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"fewer than {count} ready:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(300)
def test_two_processes_share_the_queue_come_back_when_killed_and_stop_together(settings, tenant, tmp_path):
    suffix = f"procs-{uuid.uuid4().hex[:6]}"
    own = private_queues(settings, suffix, worker_processes=2)
    env = {**os.environ, **settings_env(own), "PYTHONUNBUFFERED": "1"}
    name = f"sup{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / "workers.log"
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "worker.processes", "--name", name, "--", "-Q", ",".join(worker_queues(own)),
             "--concurrency", "2", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _ready(log_path, 2, supervisor)
        ping = subprocess.run([sys.executable, "-m", "worker.processes", "--name", name, "--ping"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stderr
        assert "2 worker processes answered" in ping.stdout

        client = create_app(own).test_client()
        image = base64.b64encode(make_image(64, 48, fmt="PNG")).decode()
        ids = []
        for _ in range(16):
            posted = client.post("/v1/jobs", json={"image_base64": image, "prompts": ["shirt"]}, headers=tenant.headers)
            assert posted.status_code == 202, posted.get_json()
            ids.append(posted.get_json()["id"])
        deadline = time.monotonic() + 120
        while True:
            statuses = [client.get(f"/v1/jobs/{i}", headers=tenant.headers).get_json()["status"] for i in ids]
            if all(s == "succeeded" for s in statuses):
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.3)
        # each process took jobs: a process holds at most `concurrency` messages (prefetch multiplier 1)
        stats = make_celery(own).control.inspect(destination=[f"{name}-1@{os.uname().nodename}",
                                                              f"{name}-2@{os.uname().nodename}"], timeout=10).stats()
        done = {node: sum((s.get("total") or {}).values()) for node, s in (stats or {}).items()}
        assert len(done) == 2 and all(n > 0 for n in done.values()) and sum(done.values()) == 16, done

        first = _children(supervisor.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)  # the kernel's OOM killer, say
        _ready(log_path, 3, supervisor)
        again = _children(supervisor.pid)
        assert len(again) == 2 and first[0] not in again and first[1] in again
        assert b"exited with -9; starting it again" in log_path.read_bytes()

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        for pid in again:  # none outlives the supervisor
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
