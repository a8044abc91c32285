"""A per-process cache of API keys and their tenants (used by api.auth).

A create costs one INSERT; looking its key up in Postgres cost about as much again (the join,
the connection's checkout and ping). `KeyCache` keeps each key's tenant (a detached snapshot:
id, limits, input buckets) for CLIPMASK_AUTH_CACHE_S and compares a Redis counter on every
request (one GET): the CLI's `key revoke`, `tenant disable` and `tenant limits` bump it after
their commit (`shared.tenants.tenants_changed`), so every process's cache ends at once. Unknown
keys are never cached; when Redis does not answer, the key is looked up in Postgres as before.
"""

from __future__ import annotations

import threading
import time

import redis
from sqlalchemy.orm import Session

from shared.settings import Settings
from shared.tables import Tenant
from shared.tenants import authenticate, generation_key, hash_key

MAX_ENTRIES = 10_000  # past it the cache starts over (keys are few; this bounds a flood of bad ones)


class KeyCache:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.ttl = settings.auth_cache_s
        self.client = client
        self.key = generation_key(settings)
        self.entries: dict[str, tuple[Tenant, bytes, float]] = {}
        self.lock = threading.Lock()

    def tenant(self, session: Session, api_key: str) -> Tenant | None:
        """The active key's tenant, from the cache while nothing changed, else from Postgres."""
        if self.ttl <= 0:
            return self._load(session, api_key)
        try:
            generation: bytes = self.client.get(self.key) or b"0"  # type: ignore[assignment]
        except redis.RedisError:
            return self._load(session, api_key)
        digest, now = hash_key(api_key), time.monotonic()
        hit = self.entries.get(digest)
        if hit is not None and hit[1] == generation and hit[2] > now:
            return hit[0]
        tenant = self._load(session, api_key)
        with self.lock:
            if tenant is None:
                self.entries.pop(digest, None)
            else:
                if len(self.entries) >= MAX_ENTRIES:
                    self.entries.clear()
                # read before the load: a change committed meanwhile bumps past it, so it is reloaded
                self.entries[digest] = (tenant, generation, now + self.ttl)
        return tenant

    @staticmethod
    def _load(session: Session, api_key: str) -> Tenant | None:
        tenant = authenticate(session, api_key)
        session.rollback()  # end the read transaction; handlers open their own
        return tenant
