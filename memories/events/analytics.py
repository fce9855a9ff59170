"""Per-tenant event statistics in Redis, kept by the `analytics` consumer group.

Keys (tenant `t`):
    analytics:t:types        hash   event type -> count (totals, errors = `error.occurred`)
    analytics:t:sec:<epoch>  string events in that second (by stream id time), expire after 2 min
    analytics:t:sessions     set    session ids started and not yet ended
    analytics:t:ended:<id>   string an ended session, so a late `session.started` (a taken-over
                                    entry arrives after its `session.ended`) does not revive it
    analytics:seen:<id>      string the stream id was counted (SET NX), so redelivery counts once

One Lua script applies an event, marker included, atomically. The marker lives SEEN_TTL_SECONDS,
longer than an entry can stay pending before it is dead-lettered; an entry replayed after that
(a group reset to an old id) is counted again.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from redis.commands.core import Script

from memories.events.stream import redis_client

WINDOW_SECONDS = 60
BUCKET_TTL_SECONDS = 2 * WINDOW_SECONDS
ENDED_TTL_SECONDS = 24 * 3600
TOP_TYPES = 5

_RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('INCR', KEYS[3])
redis.call('EXPIREAT', KEYS[3], ARGV[3])
if ARGV[4] ~= '' then
  if ARGV[2] == 'session.started' then
    if redis.call('EXISTS', KEYS[5]) == 0 then redis.call('SADD', KEYS[4], ARGV[4]) end
  elseif ARGV[2] == 'session.ended' then
    redis.call('SREM', KEYS[4], ARGV[4])
    redis.call('SET', KEYS[5], '1', 'EX', ARGV[5])
  end
end
return 1
"""


def _key(tenant_id: str, *parts: object) -> str:
    return ":".join(["analytics", tenant_id, *map(str, parts)])


def _seen_ttl_seconds() -> int:
    pending_for = settings.EVENT_CONSUMER_MAX_DELIVERIES * settings.EVENT_CONSUMER_CLAIM_IDLE_MS
    return max(3600, 2 * pending_for // 1000)


@cache
def _record_script() -> Script:
    return redis_client().register_script(_RECORD)


def analytics_record(stream_id: str, event: dict[str, Any]) -> None:
    """Count one stream entry (the `analytics` group's handler); counting it again is a no-op."""
    analytics_record_many([(stream_id, event)])


def analytics_record_many(entries: list[tuple[str, dict[str, Any]]]) -> None:
    """`analytics_record` for a whole read of the stream, in one round trip to Redis."""
    script = _record_script()
    with redis_client().pipeline(transaction=False) as pipe:
        for stream_id, event in entries:
            source = event.get("source") or {}
            tenant_id = source.get("tenant_id") or ""
            if not tenant_id:
                continue
            second = (
                int(stream_id.split("-", 1)[0]) // 1000
            )  # the event's time: replays bucket right
            session_id = source.get("session_id") or ""
            script(
                keys=[
                    # By event, not entry: the relay may publish an event again under a new id.
                    f"analytics:seen:{event['event_id']}",
                    _key(tenant_id, "types"),
                    _key(tenant_id, "sec", second),
                    _key(tenant_id, "sessions"),
                    _key(tenant_id, "ended", session_id),
                ],
                args=[_seen_ttl_seconds(), event["event_type"], second + BUCKET_TTL_SECONDS,
                      session_id, ENDED_TTL_SECONDS],
                client=pipe,
            )  # fmt: skip
        pipe.execute()


def analytics_summary(tenant_id: str) -> dict[str, Any]:
    """The tenant's statistics: totals by type, the top types, events/s over the last minute,
    the share of `error.occurred` events, and the sessions started and not ended."""
    client = redis_client()
    now = int(client.time()[0])  # Redis's clock: the one stream ids (and buckets) are made with
    seconds = range(now - WINDOW_SECONDS + 1, now + 1)
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(_key(tenant_id, "types"))
        pipe.mget([_key(tenant_id, "sec", second) for second in seconds])
        pipe.scard(_key(tenant_id, "sessions"))
        by_type_raw, buckets, active_sessions = pipe.execute()
    by_type = {event_type: int(count) for event_type, count in by_type_raw.items()}
    total = sum(by_type.values())
    top = sorted(by_type.items(), key=lambda item: (-item[1], item[0]))[:TOP_TYPES]
    return {
        "total_events": total,
        "by_type": dict(sorted(by_type.items())),
        "top_event_types": [[event_type, count] for event_type, count in top],
        "events_per_second": round(sum(int(b or 0) for b in buckets) / WINDOW_SECONDS, 4),
        "error_rate": round(by_type.get("error.occurred", 0) / total, 4) if total else 0.0,
        "active_sessions": active_sessions,
    }
