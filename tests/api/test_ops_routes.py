"""/healthz, /readyz, /openapi.json, /docs, and the problem documents of unknown routes."""

from __future__ import annotations

import re

from api import create_app
from api.openapi import document


def test_healthz_needs_no_auth(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_checks_every_dependency(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"postgres": "ok", "redis": "ok", "storage": "ok"}


def test_readyz_names_the_dependency_that_is_down(settings):
    broken = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9", "s3_max_attempts": 1,
                                         "s3_connect_timeout_s": 1})
    resp = create_app(broken).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    problem = resp.get_json()
    assert problem["code"] == "dependency_unavailable"
    assert [e["field"] for e in problem["errors"]] == ["storage"]


def test_database_down_is_503_not_500(settings):
    broken = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:9/none"})
    client = create_app(broken).test_client()
    resp = client.get("/v1/jobs", headers={"Authorization": "Bearer cm_whatever"})
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "5"
    assert resp.get_json()["code"] == "dependency_unavailable"


def test_openapi_documents_exactly_the_routes_served(app, client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # (a converter, <path:id>, is no part of it)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method.lower()))
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented
    assert doc == document()


def test_docs_page_renders_the_document(client):
    resp = client.get("/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert b"/openapi.json" in resp.data


def test_unknown_route_and_method_are_problems(client, tenant):
    resp = client.get("/v1/nothing-here", headers=tenant.headers)
    assert resp.status_code == 404 and resp.content_type == "application/problem+json"
    resp = client.delete("/v1/jobs", headers=tenant.headers)
    assert resp.status_code == 405 and resp.get_json()["code"] == "method_not_allowed"


def test_a_uri_over_8_kib_is_a_414_problem_on_every_route(client, tenant):
    long_query = "status=" + "queued," * 1300
    for path in (f"/v1/jobs?{long_query}", f"/healthz?{long_query}", f"/v1/jobs/{'x' * 9000}"):
        resp = client.get(path, headers=tenant.headers)
        assert resp.status_code == 414 and resp.content_type == "application/problem+json", path
        assert resp.get_json()["code"] == "uri_too_long"
    assert client.get("/openapi.json").get_json()["paths"]["/healthz"]["get"]["responses"]["414"]
