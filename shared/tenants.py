"""Tenants and API keys. Keys are shown once, stored as sha256 hashes."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.settings import Settings
from shared.tables import ApiKey, Tenant

log = logging.getLogger(__name__)

KEY_PREFIX = "cm_"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewTenant:
    tenant_id: str
    api_key: str
    webhook_secret: str


def create_tenant(session: Session, *, name: str) -> NewTenant:
    """Create a tenant with one API key and a Standard Webhooks secret (`whsec_...`)."""
    tenant = Tenant(
        id=f"ten_{uuid.uuid4().hex}",
        name=name,
        webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii"),
    )
    session.add(tenant)
    session.flush()
    api_key = create_api_key(session, tenant_id=tenant.id)
    return NewTenant(tenant_id=tenant.id, api_key=api_key, webhook_secret=tenant.webhook_secret)


def create_api_key(session: Session, *, tenant_id: str) -> str:
    """Add a key to a tenant and return it in clear (the only time it exists in clear)."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=f"key_{uuid.uuid4().hex}", tenant_id=tenant_id, key_hash=hash_key(api_key),
               prefix=api_key[:10])
    )
    session.flush()
    return api_key


def authenticate(session: Session, api_key: str) -> Tenant | None:
    """The tenant owning an active key, or None for an unknown, revoked or disabled one."""
    row = session.execute(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(api_key), ApiKey.revoked_at.is_(None), Tenant.disabled_at.is_(None))
    ).scalar_one_or_none()
    if row is not None:
        session.expunge(row)  # a snapshot: no reload after the request's commits and rollbacks
    return row


def generation_key(settings: Settings) -> str:
    """The Redis counter API processes compare their cached keys and tenants against."""
    return f"{settings.redis_key_prefix}clipmask:tenants:generation"


def tenants_changed(settings: Settings) -> None:
    """After a commit that revoked a key or changed a tenant: every API process drops its cache
    (api.auth.KeyCache) before its next request. If Redis can't be told, caches age out within
    CLIPMASK_AUTH_CACHE_S, and the operator is told so."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.incr(generation_key(settings))
    except redis.RedisError as exc:
        log.warning("could not tell the API processes (Redis: %s); they keep cached keys and limits for up "
                    "to %g s", exc, settings.auth_cache_s)
    finally:
        client.close()


def revoke_key(session: Session, *, key: str) -> ApiKey | None:
    """Revoke a key given in clear or by its id (key_...); None if there is no active such key."""
    where = ApiKey.id == key if key.startswith("key_") else ApiKey.key_hash == hash_key(key)
    row = session.execute(select(ApiKey).where(where)).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    row.revoked_at = dt.datetime.now(dt.UTC)
    return row
