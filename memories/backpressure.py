"""Admission control: refuse new work with 429 before anything is recorded, so that a flood slows
producers down instead of exhausting memory; what was accepted (202) is never dropped later.

Two measures, both cheap: the depth of each Celery lane in Redis (LLEN) and the number of
`pending` requests in PostgreSQL (a partial index). Per-tenant rate limits are a token bucket in
Redis, refilled continuously, checked atomically by a Lua script.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def admit(lane: Queue, *, tenant_id: str) -> None:
    """Raise Overloaded (429) when the lane, or the tenant's share of it, is too deep to take
    more work. Each lane is judged by its own depth, so a flood of one kind of work does not shut
    out the others; and each tenant by its own pending requests in the lane
    (TENANT_MAX_PENDING, and TENANT_HIGH_MAX_PENDING on `high`, a per-tenant allowance), so one
    tenant's flood is refused before it fills the lane for everyone. The `batch` lane also
    carries bulk event publishing and webhook deliveries: a backlog of those slows async batches
    down too."""
    if lane is Queue.HIGH:
        limit, tenant_limit = settings.BACKPRESSURE_HIGH_MAX_DEPTH, settings.TENANT_HIGH_MAX_PENDING
    else:
        limit, tenant_limit = settings.BACKPRESSURE_MAX_DEPTH, settings.TENANT_MAX_PENDING
    tenant_pending = _cached(f"tenant:{tenant_id}", lambda: pending_by_lane(tenant_id=tenant_id))
    if tenant_pending[lane.value] >= tenant_limit:
        metrics.REFUSALS.labels(lane=lane.value, reason="tenant_overload").inc()
        raise Overloaded(
            f"This tenant has {tenant_pending[lane.value]} jobs waiting on the {lane.value} lane;"
            " retry later.",
            retry_after=settings.BACKPRESSURE_RETRY_AFTER_SECONDS,
        )
    depth = _cached("depths", lane_depths)[lane.value]
    pending = _cached("pending", pending_by_lane)[lane.value]
    if depth >= limit or pending >= limit:
        metrics.REFUSALS.labels(lane=lane.value, reason="overload").inc()
        raise Overloaded(
            f"The {lane.value} lane is full ({max(depth, pending)} jobs waiting); retry later.",
            retry_after=settings.BACKPRESSURE_RETRY_AFTER_SECONDS,
        )


_embedding_slots = threading.BoundedSemaphore(1)
_embedding_slots_size = 1
_embedding_slots_lock = threading.Lock()


@contextmanager
def embedding_slot() -> Iterator[None]:
    """Hold one of the process's WEB_EMBEDDING_CONCURRENCY slots for an embedding call made in a
    web thread (a correction, a search, a synchronous batch), or raise Overloaded (429): a burst
    of them cannot take every web thread, nor hammer the provider."""
    global _embedding_slots, _embedding_slots_size
    with _embedding_slots_lock:
        if _embedding_slots_size != settings.WEB_EMBEDDING_CONCURRENCY:
            _embedding_slots_size = settings.WEB_EMBEDDING_CONCURRENCY
            _embedding_slots = threading.BoundedSemaphore(_embedding_slots_size)
        slots = _embedding_slots
    if not slots.acquire(timeout=settings.WEB_EMBEDDING_WAIT_SECONDS):
        metrics.REFUSALS.labels(lane="web", reason="embedding_busy").inc()
        raise Overloaded(
            "Too many embedding calls at once in this server; retry shortly.",
            retry_after=1,
        )
    try:
        yield
    finally:
        slots.release()


# KEYS[1] bucket; ARGV: rate per second, burst, cost. Returns {allowed, tokens}. Redis's clock, so
# web hosts whose clocks differ share one bucket fairly. A call is let in while the bucket holds a
# token, and takes its whole cost, into debt if need be (a 10,000-item batch then waits the debt
# out): so a call costing more than the burst is never refused for ever.
_TOKEN_BUCKET = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - cost; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil((burst - math.min(tokens, 0)) / rate) + 1)
return {allowed, tostring(tokens)}
"""


@cache
def _token_bucket(client: Any) -> Any:
    # A registered script runs by its SHA (EVALSHA, loading it if Redis lacks it), not as source
    # on every request; one per client, built once.
    return client.register_script(_TOKEN_BUCKET)


def rate_limit(tenant_id: str, *, cost: int = 1) -> dict[str, str]:
    """Charge the call's cost to the tenant's bucket (a status poll 1, a job its messages, a
    batch its items); return the limit headers, or raise RateLimited."""
    rate, burst = settings.RATE_LIMIT_PER_SECOND, settings.RATE_LIMIT_BURST
    if rate <= 0 or cost <= 0:
        return {}
    allowed, tokens = _token_bucket(redis_client())(
        keys=[f"ratelimit:{tenant_id}"], args=[rate, burst, cost]
    )
    remaining = max(0, int(float(tokens)))
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
