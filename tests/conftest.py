"""Real parts for every test run: its own Postgres database, its own bucket on an S3-protocol
server (moto's server mode, over HTTP), its own Redis key prefix and queue, a tiny random-weight
CLIPSeg saved with save_pretrained, and a real Celery worker process. All are removed at the end."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from PIL import Image

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:10]
ADMIN_DSN = os.environ.get("CLIPMASK_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


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


# ---- services -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"clipmask_test_{RUN_ID}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    from shared.migrate import upgrade

    upgrade(url)
    yield url
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.devmodel import write_dev_model

    return write_dev_model(tmp_path_factory.mktemp("tiny-clipseg"), size="tiny")


@pytest.fixture(scope="session")
def settings(database_url: str, s3_endpoint: str, tiny_model_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url="redis://127.0.0.1:6379/0",
        redis_key_prefix=f"clipmask-test-{RUN_ID}:",
        interactive_queue=f"interactive-{RUN_ID}",
        bulk_queue=f"bulk-{RUN_ID}",
        events_queue=f"events-{RUN_ID}",
        s3_endpoint_url=s3_endpoint,
        s3_bucket=f"clipmask-test-{RUN_ID}",
        s3_access_key_id="test",
        s3_secret_access_key="test",
        s3_max_attempts=2,
        model=str(tiny_model_dir),
        device="cpu",
        allow_private_networks=True,  # the test image server is on 127.0.0.1
        max_batch_wait_ms=2,
        fetch_total_timeout_s=10,
        fetch_read_timeout_s=3,
        log_level="INFO",
        worker_metrics_port=free_port(),
    )


@pytest.fixture(scope="session")
def storage(settings: Settings) -> Iterator[Any]:
    from shared.storage import ObjectStorage

    store = ObjectStorage(settings)
    store.ensure_bucket()
    yield store
    keys = store.list_keys("")
    if keys:
        store.delete(keys)
    store._client.delete_bucket(Bucket=settings.s3_bucket)


@pytest.fixture(scope="session")
def sessions(settings: Settings) -> Any:
    from shared.db import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database_url, pool_size=2))


@pytest.fixture(scope="session")
def worker(settings: Settings, storage: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real `celery worker` process (threads pool) consuming this run's queue."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(settings, log_path, name=f"test-{RUN_ID}")
    yield log_path
    stop_process(proc)


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


# ---- API ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def app(settings: Settings, storage: Any) -> Any:
    from api import create_app

    flask_app = create_app(settings)
    flask_app.testing = True
    return flask_app


@pytest.fixture()
def client(app: Any) -> Any:
    return app.test_client()


@dataclass
class TestTenant:
    tenant_id: str
    api_key: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture()
def make_tenant(sessions: Any) -> Callable[[], TestTenant]:
    from shared.db import session_scope
    from shared.tenants import create_tenant

    def make() -> TestTenant:
        with session_scope(sessions) as session:
            new = create_tenant(session, name=f"t-{uuid.uuid4().hex[:6]}")
        return TestTenant(new.tenant_id, new.api_key, new.webhook_secret)

    return make


@pytest.fixture()
def tenant(make_tenant: Callable[[], TestTenant]) -> TestTenant:
    return make_tenant()


def wait_for_job(client: Any, tenant: TestTenant, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
        if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


# ---- images and an HTTP server for image URLs -------------------------------------------

def make_image(width: int = 160, height: int = 120, fmt: str = "JPEG", mode: str = "RGB", **save: Any) -> bytes:
    """A picture with structure (gradients and a block), so masks are not trivially uniform."""
    img = Image.new("RGB", (width, height))
    pixels = img.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = ((x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), (x * y) % 256)
    img.paste((250, 20, 20), (width // 4, height // 4, width // 2, height // 2))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


class ImageServer:
    """Serves registered paths on 127.0.0.1: bytes, redirects or a status code."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes, *, status: int = 200, content_type: str = "image/jpeg") -> str:
        self.routes[path] = (status, {"Content-Type": content_type}, body)
        return self.base + path

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        self.routes[path] = (status, {"Location": to}, b"")
        return self.base + path


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _clean_redis_prefix(settings: Settings) -> Iterator[None]:
    """Remove this run's Redis keys (queues, unacked messages) when the run ends."""
    yield
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(match=f"{settings.redis_key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
