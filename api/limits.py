"""Per-tenant request rate: a token bucket in Redis (the cap on queued jobs is `shared.submit`'s).

Over the rate, 429 `rate_limited` with Retry-After. The bucket lives in Redis so that every API process shares
it; when Redis does not answer the limiter lets the request through (the queue being down is
reported by the route that needs it, with 503), so a Redis hiccup never locks tenants out.
"""

from __future__ import annotations

import logging
import math

import redis

from api.problems import ApiProblem
from shared.settings import Settings
from shared.tables import Tenant

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV rate (tokens/s), burst. Returns {allowed 0|1, seconds until a token}.
# Redis's own clock, so API processes on different hosts agree.
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.script = self.client.register_script(TOKEN_BUCKET)
        self.prefix = f"{settings.redis_key_prefix}clipmask:ratelimit:"

    def check(self, tenant: Tenant) -> None:
        """Take one token for the tenant or raise 429 `rate_limited`."""
        rate = tenant.rate_limit_per_s if tenant.rate_limit_per_s is not None else self.settings.rate_limit_per_s
        burst = tenant.rate_limit_burst if tenant.rate_limit_burst is not None else self.settings.rate_limit_burst
        if rate <= 0:
            return
        try:
            allowed, wait = self.script(keys=[self.prefix + tenant.id], args=[rate, burst])
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, request let through: %s", exc, extra={"tenant_id": tenant.id})
            return
        if not int(allowed):
            retry_after = max(1, math.ceil(float(wait)))
            raise ApiProblem(429, "rate_limited",
                             f"Too many requests: this key allows {rate:g} per second (bursts of {burst}).",
                             headers={"Retry-After": str(retry_after)})
