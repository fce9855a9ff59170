"""The last ~15 minutes of the service's pulse, per second, in Redis, for the staff dashboard's
charts: events published (in all, and per tenant), how long finished requests took (a histogram
per second, so p50 / p99 can be read for any window), and each lane's depth when it was sampled.

Prometheus's multiprocess files keep no history, and a dashboard must show the last minutes
right after it is opened; so every process adds to one small hash per second, `ts:<epoch>`,
which expires by itself after SERIES_TTL_SECONDS. Writes ride on a round trip their caller makes
anyway (the publisher's pipeline) or cost one pipelined HINCRBY/EXPIRE; a failed write is
dropped (these are charts, never worth failing a request for).

    events_count(pipe, events)            in the caller's pipeline: +len(events), per tenant too
    job_finished(pipe, seconds=...)       one request ended, `seconds` after it was accepted
    lane_depths_sampled(client, depths)   a reading of the lanes' depth, at most one a second
    series(client, tenant_id=...)         the window, oldest first, for the charts

Each takes the caller's Redis client (the service's shared one), so this module stays below
the event modules that write to it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 15 * 60
# A minute longer than the window, so the window's oldest second is still whole when read.
SERIES_TTL_SECONDS = WINDOW_SECONDS + 60
KEY_PREFIX = "ts:"
EVENTS = "events"
# Latency buckets grow by a fifth: bucket b holds (GROWTH**(b-1), GROWTH**b] milliseconds, so
# a percentile read from them is at most 20% high; 1 ms to an hour fits in ~85 buckets.
GROWTH = 1.2
_LAT = "lat:"
_LANE = "lane:"

# The second of this process's last lane sample (one a second is all a per-second chart shows).
_last_lane_sample = 0


def _key(second: int) -> str:
    return f"{KEY_PREFIX}{second}"


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a duration (bucket 0: a millisecond or less)."""
    millis = seconds * 1000
    if millis <= 1:
        return 0
    return math.ceil(math.log(millis) / math.log(GROWTH) - 1e-9)


def bucket_upper_seconds(bucket: int) -> float:
    return float(GROWTH**bucket) / 1000


def events_count(pipe: Any, events: Iterable[Mapping[str, Any]]) -> None:
    """Count published events in `pipe` (the caller executes it): the total and per tenant."""
    per_tenant: dict[str, int] = {}
    for event in events:
        tenant_id = str(event.get("source", {}).get("tenant_id") or "")
        per_tenant[tenant_id] = per_tenant.get(tenant_id, 0) + 1
    if not per_tenant:
        return
    key = _key(int(time.time()))
    pipe.hincrby(key, EVENTS, sum(per_tenant.values()))
    for tenant_id, count in per_tenant.items():
        if tenant_id:
            pipe.hincrby(key, f"{EVENTS}:{tenant_id}", count)
    pipe.expire(key, SERIES_TTL_SECONDS)


def job_finished(pipe: Any, *, seconds: float) -> None:
    """Record one finished request (success or failure) that took `seconds` from acceptance, in
    a pipeline the caller sends (the ledger's announcement of the end: no round trip of its
    own)."""
    key = _key(int(time.time()))
    pipe.hincrby(key, f"{_LAT}{latency_bucket(max(seconds, 0.0))}", 1)
    pipe.expire(key, SERIES_TTL_SECONDS)


def lane_depths_sampled(client: Any, depths: Mapping[str, int]) -> None:
    """Keep a reading of the lanes' depth for this second; further readings in the same second
    (of this process) are not written again."""
    global _last_lane_sample
    second = int(time.time())
    if second == _last_lane_sample:
        return
    _last_lane_sample = second
    key = _key(second)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={f"{_LANE}{lane}": depth for lane, depth in depths.items()})
            pipe.expire(key, SERIES_TTL_SECONDS)
            pipe.execute()
    except RedisError as exc:
        logger.warning("timeseries: a lane sample was not recorded: %s", exc)


def _percentile(histogram: Mapping[int, int], fraction: float) -> float | None:
    total = sum(histogram.values())
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_upper_seconds(bucket)
    return bucket_upper_seconds(max(histogram))  # pragma: no cover (the loop always returns)


def series(
    client: Any,
    *,
    seconds: int = WINDOW_SECONDS,
    tenant_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The last `seconds` (at most the window), oldest first, as parallel lists for a chart:
    `t` (epoch seconds), `events` (all tenants) and `tenant_events` (the tenant's, with
    `tenant_id`), `p50` / `p99` (seconds, None in a second when no request finished), and
    `lanes` (lane -> depth, None in a second with no sample). One pipelined round trip."""
    seconds = max(1, min(seconds, WINDOW_SECONDS))
    end = int(now if now is not None else time.time())
    stamps = list(range(end - seconds + 1, end + 1))
    with client.pipeline(transaction=False) as pipe:
        for second in stamps:
            pipe.hgetall(_key(second))
        buckets: list[dict[str, str]] = pipe.execute()
    out: dict[str, Any] = {"t": stamps, "events": [], "tenant_events": [], "p50": [], "p99": []}
    lanes: dict[str, list[int | None]] = {}
    tenant_field = f"{EVENTS}:{tenant_id}" if tenant_id else None
    for index, fields in enumerate(buckets):
        out["events"].append(int(fields.get(EVENTS, 0)))
        out["tenant_events"].append(int(fields.get(tenant_field, 0)) if tenant_field else 0)
        histogram = {
            int(name[len(_LAT) :]): int(count)
            for name, count in fields.items()
            if name.startswith(_LAT)
        }
        out["p50"].append(_percentile(histogram, 0.50))
        out["p99"].append(_percentile(histogram, 0.99))
        for name, depth in fields.items():
            if name.startswith(_LANE):
                column = lanes.setdefault(name[len(_LANE) :], [None] * len(stamps))
                column[index] = int(depth)
    out["lanes"] = lanes
    return out
