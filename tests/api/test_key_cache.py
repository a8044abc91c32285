"""The API's cache of keys and tenants (api.keys.KeyCache): the CLI's changes end it at once in
every process; changes made to the rows by hand are seen within CLIPMASK_AUTH_CACHE_S."""

from __future__ import annotations

import time

from api import create_app
from shared.clock import utcnow
from shared.db import session_scope
from shared.tables import Tenant
from shared.tenants import tenants_changed
from tests.support.cli import clipmask, lines


def test_a_revoke_reaches_a_process_that_cached_the_key(settings, make_tenant):
    tenant = make_tenant()
    first, second = create_app(settings).test_client(), create_app(settings).test_client()  # two API processes
    for client in (first, second):
        assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    lines(clipmask(settings, "key", "revoke", tenant.api_key))
    for client in (first, second):
        assert client.get("/v1/jobs", headers=tenant.headers).status_code == 401


def test_a_hand_edit_is_seen_after_the_cache_time_or_at_once_when_announced(settings, make_tenant, sessions):
    client = create_app(settings.model_copy(update={"auth_cache_s": 1.0})).test_client()
    tenant = make_tenant()
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).disabled_at = utcnow()
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200  # answered from the cache
    time.sleep(1.1)
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 401

    other = make_tenant()
    assert client.get("/v1/jobs", headers=other.headers).status_code == 200
    with session_scope(sessions) as session:
        session.get(Tenant, other.tenant_id).disabled_at = utcnow()
    tenants_changed(settings)
    assert client.get("/v1/jobs", headers=other.headers).status_code == 401


def test_without_the_cache_every_request_reads_postgres(settings, make_tenant, sessions):
    client = create_app(settings.model_copy(update={"auth_cache_s": 0})).test_client()
    tenant = make_tenant()
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    with session_scope(sessions) as session:
        session.get(Tenant, tenant.tenant_id).disabled_at = utcnow()
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 401
