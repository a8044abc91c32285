"""Dependencies a test can take away: an S3 server process and a TCP forwarder in front of Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import requests

from tests.support.services import ROOT, pg_port


def start_s3_server(port: int) -> subprocess.Popen:
    """moto's S3-protocol server as its own process on a fixed port (it keeps nothing on restart)."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except requests.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    return proc


def start_postgres_proxy(port: int) -> subprocess.Popen:
    """A TCP forwarder process to Postgres; killing it makes the database unreachable."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.tcp_proxy", str(port), "127.0.0.1", str(pg_port())],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
    return proc


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
