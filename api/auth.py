"""Bearer API-key authentication for every /v1 route (keys resolved through api.keys.KeyCache)."""

from __future__ import annotations

from flask import g, request

from api.problems import ApiProblem
from api.services import db, services
from shared.tables import Tenant


def require_tenant() -> None:
    """before_request hook: resolve the key to its tenant (else 401), then take a rate token (else 429)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiProblem(401, "unauthorized", "Send your API key as 'Authorization: Bearer <api_key>'.")
    tenant = services().keys.tenant(db(), token.strip())
    if tenant is None:
        raise ApiProblem(401, "unauthorized", "The API key is unknown or revoked.")
    g.tenant = tenant
    services().limiter.check(tenant)


def current_tenant() -> Tenant:
    tenant: Tenant = g.tenant
    return tenant
