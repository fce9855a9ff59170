"""Admission control: refuse new work with 429 before anything is recorded, so that a flood slows
producers down instead of exhausting memory; what was accepted (202) is never dropped later.

Two measures, both cheap: the depth of each Celery lane in Redis (LLEN) and the number of
`pending` requests in PostgreSQL (a partial index). Per-tenant rate limits are a token bucket in
Redis, refilled continuously, checked atomically by a Lua script.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from django.conf import settings

from memories import metrics
from memories.dispatch import Queue
from memories.errors import Overloaded, RateLimited
from memories.events.stream import redis_client
from memories.queue_load import lane_depths, pending_by_lane

_cache: dict[str, tuple[float, Any]] = {}
T = TypeVar("T")


def _cached(key: str, read: Callable[[], T]) -> T:
    # Under a flood every POST asks; a reading half a second old is as good and costs nothing.
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < settings.BACKPRESSURE_CACHE_SECONDS:
        return hit[1]
    value = read()
    _cache[key] = (now, value)
    return value


def admit(lane: Queue) -> None:
    """Raise Overloaded (429) when the lane is too deep to take more work. Each lane is judged by
    its own depth, so a flood of one kind of work does not shut out the others; `high` has its
    own, larger allowance. The `batch` lane also carries bulk event publishing and webhook
    deliveries: a backlog of those slows async batches down too."""
    if lane is Queue.HIGH:
        limit = settings.BACKPRESSURE_HIGH_MAX_DEPTH
    else:
        limit = settings.BACKPRESSURE_MAX_DEPTH
    depth = _cached("depths", lane_depths)[lane.value]
    pending = _cached("pending", pending_by_lane)[lane.value]
    if depth >= limit or pending >= limit:
        metrics.REFUSALS.labels(lane=lane.value, reason="overload").inc()
        raise Overloaded(
            f"The {lane.value} lane is full ({max(depth, pending)} jobs waiting); retry later.",
            retry_after=settings.BACKPRESSURE_RETRY_AFTER_SECONDS,
        )


# KEYS[1] bucket; ARGV: rate per second, burst, now (seconds, float). Returns {allowed, tokens}.
_TOKEN_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens)}
"""


@cache
def _token_bucket(client: Any) -> Any:
    # A registered script runs by its SHA (EVALSHA, loading it if Redis lacks it), not as source
    # on every request; one per client, built once.
    return client.register_script(_TOKEN_BUCKET)


def rate_limit(tenant_id: str) -> dict[str, str]:
    """Take one token from the tenant's bucket; return the limit headers, or raise RateLimited."""
    rate, burst = settings.RATE_LIMIT_PER_SECOND, settings.RATE_LIMIT_BURST
    if rate <= 0:
        return {}
    allowed, tokens = _token_bucket(redis_client())(
        keys=[f"ratelimit:{tenant_id}"], args=[rate, burst, time.time()]
    )
    remaining = int(float(tokens))
    reset = math.ceil((burst - float(tokens)) / rate)
    headers = {
        "X-RateLimit-Limit": str(burst),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset),
    }
    if not allowed:
        metrics.REFUSALS.labels(lane="api", reason="rate_limit").inc()
        raise RateLimited(
            "Rate limit exceeded for this tenant.",
            retry_after=max(1, math.ceil((1 - float(tokens)) / rate)),
            headers=headers,
        )
    return headers
