"""Property-based requests generated from /openapi.json against the API served over real HTTP:
whatever schemathesis sends, no route answers 5xx, and answers match the documented schemas."""

from __future__ import annotations

import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from werkzeug.serving import make_server

from api import create_app


@pytest.fixture(scope="module")
def served_api(settings, storage):
    app = create_app(settings.model_copy(update={"rate_limit_per_s": 0.0}))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def module_tenant(sessions):
    from shared.db import session_scope
    from shared.tenants import create_tenant

    with session_scope(sessions) as session:
        return create_tenant(session, name="schemathesis")


@pytest.fixture(scope="module")
def api_schema(served_api):
    return schemathesis.openapi.from_url(f"{served_api}/openapi.json")


def test_no_generated_request_gets_a_server_error(api_schema, module_tenant):
    # (The schemathesis pytest plugin's parametrize does not work with this pytest; hypothesis
    # drives each operation's strategy directly instead.)
    headers = {"Authorization": f"Bearer {module_tenant.api_key}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=30)

        no_server_error()
