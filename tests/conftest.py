"""Fixtures for real parts: each test run gets its own Postgres database, its own bucket on an
S3-protocol server (SeaweedFS, over HTTP, objects on disk), its own Redis key prefix and queues, a tiny
random-weight CLIPSeg saved with save_pretrained, and real Celery worker processes. All are
removed at the end. Nothing here is autouse: a test gets a service by asking for its fixture.

Tests marked `unit` (`make test-unit`) may not ask for any of SERVICE_FIXTURES; collection fails
if one does. Helpers live in tests/support/.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Imported inside the fixtures that need them, so that the engine tests (`unit`) run where only
# pytest, hypothesis, torch and transformers are installed: the GPU machine, say.
if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.support.api import TestTenant
    from tests.support.images import ImageServer

RUN_ID = uuid.uuid4().hex[:10]

# Hypothesis: `make test` runs the property tests briefly; `make fuzz` loads the "fuzz" profile.
hypothesis_settings.register_profile("default", max_examples=60, deadline=None, database=None,
                                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
hypothesis_settings.register_profile("fuzz", max_examples=1500, deadline=None, database=None,
                                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
hypothesis_settings.load_profile("default")

# Fixtures that reach Postgres, Redis, object storage or a worker process: not for `unit` tests.
SERVICE_FIXTURES = frozenset({
    "database_url", "own_database", "s3_endpoint", "settings", "storage", "sessions", "worker", "app", "client",
    "make_tenant", "tenant",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("unit") is None:
            continue
        used = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but asks for services: {sorted(used)}")


# ---- services -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    from tests.support.services import migrated_database

    with migrated_database(f"clipmask_test_{RUN_ID}") as url:
        yield url


@pytest.fixture()
def own_database() -> Iterator[str]:
    """A database of the test's own, for code that looks at every row (the reconciler, say): the
    session's database holds other tests' jobs, queued for queues nobody serves."""
    from tests.support.services import migrated_database

    with migrated_database(f"clipmask_test_{RUN_ID}_{uuid.uuid4().hex[:6]}") as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS server of the run's own (objects on disk in a temporary folder), over HTTP."""
    from tests.support.faults import kill, s3_ports, start_s3_server

    ports = s3_ports()
    server = start_s3_server(ports, tmp_path_factory.mktemp("seaweedfs") / "data")
    yield f"http://127.0.0.1:{ports.s3}"
    kill(server)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.devmodel import write_dev_model

    return write_dev_model(tmp_path_factory.mktemp("tiny-clipseg"), size="tiny")


@pytest.fixture(scope="session")
def settings(database_url: str, s3_endpoint: str, tiny_model_dir: Path) -> Iterator[Settings]:
    """This run's settings; the run's Redis keys (queues, unacked messages) are removed at the end."""
    from shared.settings import Settings
    from tests.support.services import free_port

    test_settings = Settings(
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
    yield test_settings
    import redis

    client = redis.Redis.from_url(test_settings.redis_url)
    keys = list(client.scan_iter(match=f"{test_settings.redis_key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


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
    from tests.support.services import start_worker, stop_process

    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(settings, log_path, name=f"test-{RUN_ID}")
    yield log_path
    stop_process(proc)




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




@pytest.fixture()
def make_tenant(sessions: Any) -> Callable[[], TestTenant]:
    from shared.db import session_scope
    from shared.tenants import create_tenant
    from tests.support.api import TestTenant

    def make() -> TestTenant:
        with session_scope(sessions) as session:
            new = create_tenant(session, name=f"t-{uuid.uuid4().hex[:6]}")
        return TestTenant(new.tenant_id, new.api_key, new.webhook_secret)

    return make


@pytest.fixture()
def tenant(make_tenant: Callable[[], TestTenant]) -> TestTenant:
    return make_tenant()




# ---- images and an HTTP server for image URLs -------------------------------------------



@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    from tests.support.images import ImageServer

    server = ImageServer()
    yield server
    server.httpd.shutdown()
