"""Property-based requests generated from /openapi.json against the API served over real HTTP:
whatever schemathesis sends, no route answers 5xx, and every answer is documented: its status code,
content type, body schema and headers conform to what /openapi.json says for that operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import create_app


@pytest.fixture(scope="module")
def served_api(settings, storage, tmp_path_factory):
    """The API on a real port, with a worker of its own on queues of their own: it answers
    /v1/search's text and image queries, and never takes the jobs the other api tests count as queued."""
    from tests.support.services import serving, start_worker, stop_process

    own = settings.model_copy(update={"rate_limit_per_s": 0.0, **{
        name: f"{getattr(settings, name)}-schemathesis"
        for name in ("interactive_queue", "bulk_queue", "events_queue")}})
    worker = start_worker(own, tmp_path_factory.mktemp("schemathesis") / "worker.log", name="schemathesis")
    try:
        with serving(create_app(own)) as url:
            yield url
    finally:
        stop_process(worker)


@pytest.fixture(scope="module")
def module_tenant(sessions):
    from shared.db import session_scope
    from shared.tenants import create_tenant

    with session_scope(sessions) as session:
        return create_tenant(session, name="schemathesis")


@pytest.fixture(scope="module")
def seeded(served_api, module_tenant):
    """A job and a batch of this tenant, so list answers hold real objects whose schema gets checked."""
    import requests

    headers = {"Authorization": f"Bearer {module_tenant.api_key}"}
    job = requests.post(f"{served_api}/v1/jobs", headers=headers, timeout=10,
                        json={"image_url": "https://example.com/seed.jpg", "prompts": ["shirt"]})
    batch = requests.post(f"{served_api}/v1/batches", headers=headers, timeout=10,
                          json={"prompts": ["dress"], "items": [{"image_url": "https://example.com/b.jpg"}]})
    assert job.status_code == 202 and batch.status_code == 202
    return job.json(), batch.json()


@pytest.fixture(scope="module")
def api_schema(served_api):
    return schemathesis.openapi.from_url(f"{served_api}/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


def test_generated_requests_get_documented_answers(api_schema, module_tenant, seeded):
    # (The schemathesis pytest plugin's parametrize does not work with this pytest; hypothesis
    # drives each operation's strategy directly instead.)
    headers = {"Authorization": f"Bearer {module_tenant.api_key}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def documented_answer(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

        documented_answer()
