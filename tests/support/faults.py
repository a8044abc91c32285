"""Dependencies a test can take away: an S3 server process and a TCP forwarder in front of Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli.dev_s3 import Ports
from cli.dev_s3 import start as start_seaweedfs
from tests.support.services import ROOT, free_port, pg_port

# The keys the test settings use (tests/conftest.py)
S3_KEYS = {"access_key": "test", "secret_key": "test"}


def s3_ports() -> Ports:
    """Free ports for one SeaweedFS server (its S3 gateway, master, volume server and filer)."""
    return Ports(*(free_port() for _ in range(8)))


def start_s3_server(ports: Ports, data_dir: Path) -> subprocess.Popen:
    """SeaweedFS's S3 server as its own process group, objects on disk under `data_dir`: started
    again with the same ports and folder, it serves what it held before."""
    return start_seaweedfs(data_dir, ports, log_path=data_dir.parent / f"{data_dir.name}.log", **S3_KEYS)


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
