"""Per-tenant event statistics in Redis, kept by the `analytics` consumer group.

Keys (tenant `t`):
    analytics:t:types        hash   event type -> count (totals, errors = `error.occurred`)
    analytics:t:sec:<epoch>  string events in that second (by stream id time), expire after 2 min
    analytics:t:sessions     set    session ids started and not yet ended
    analytics:t:ended:<id>   string an ended session, so a late `session.started` (a taken-over
                                    entry arrives after its `session.ended`) does not revive it
    analytics:seen:<id>      string the stream id was counted (SET NX), so redelivery counts once

One Lua script applies a read's events, each with its marker, atomically. The marker lives
SEEN_TTL_SECONDS, longer than an entry can stay pending before it is dead-lettered; an entry
replayed after that (a group reset to an old id) is counted again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from redis.exceptions import NoScriptError

from memories.events.stream import StreamEntry, redis_client

WINDOW_SECONDS = 60
BUCKET_TTL_SECONDS = 2 * WINDOW_SECONDS
ENDED_TTL_SECONDS = 24 * 3600
TOP_TYPES = 5

# Count a whole read of entries, in one call. KEYS: 3 per entry (its seen marker, its tenant's
# types, its second's bucket), then 2 per session start or end (the tenant's sessions, the ended
# marker of the session). ARGV: the seen TTL, the ended TTL, the entry count, then 2 per entry
# (its type, its bucket's expiry), then 2 per session start or end (its entry's number, from 1,
# and the session id). Most events touch no session: they pass no session keys.
_RECORD = """
local n = tonumber(ARGV[3])
local counted, fresh, by_type, by_second, expiry = 0, {}, {}, {}, {}
for i = 0, n - 1 do
  local k, a = i * 3, 4 + i * 2
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ARGV[1]) then
    counted = counted + 1
    fresh[i + 1] = true
    -- Summed here and written once per key below: a read's thousand events of one tenant cost
    -- one HINCRBY and one INCRBY, not a thousand each.
    local types = by_type[KEYS[k + 2]] or {}
    types[ARGV[a]] = (types[ARGV[a]] or 0) + 1
    by_type[KEYS[k + 2]] = types
    by_second[KEYS[k + 3]] = (by_second[KEYS[k + 3]] or 0) + 1
    expiry[KEYS[k + 3]] = ARGV[a + 1]
  end
end
for key, types in pairs(by_type) do
  for event_type, count in pairs(types) do redis.call('HINCRBY', key, event_type, count) end
end
for key, count in pairs(by_second) do
  redis.call('INCRBY', key, count)
  redis.call('EXPIREAT', key, expiry[key])
end
local k = n * 3
for a = 4 + n * 2, #ARGV, 2 do
  local entry, session = tonumber(ARGV[a]), ARGV[a + 1]
  if fresh[entry] then
    if ARGV[2 + 2 * entry] == 'session.started' then
      if redis.call('EXISTS', KEYS[k + 2]) == 0 then redis.call('SADD', KEYS[k + 1], session) end
    else
      redis.call('SREM', KEYS[k + 1], session)
      redis.call('SET', KEYS[k + 2], '1', 'EX', ARGV[2])
    end
  end
  k = k + 2
end
return counted
"""
_RECORD_SHA = hashlib.sha1(_RECORD.encode()).hexdigest()


def _key(tenant_id: str, *parts: object) -> str:
    return ":".join(["analytics", tenant_id, *map(str, parts)])


def _seen_ttl_seconds() -> int:
    pending_for = settings.EVENT_CONSUMER_MAX_DELIVERIES * settings.EVENT_CONSUMER_CLAIM_IDLE_MS
    return max(3600, 2 * pending_for // 1000)


def analytics_record(stream_id: str, event: dict[str, Any]) -> None:
    """Count one stream entry (the `analytics` group's handler); counting it again is a no-op."""
    source = event.get("source") or {}
    _count(
        [(stream_id, event["event_id"], event["event_type"], source.get("tenant_id") or "",
          source.get("session_id") or "")]
    )  # fmt: skip


def analytics_record_many(entries: list[StreamEntry]) -> None:
    """`analytics_record` for a whole read of the stream, in one call to Redis; it reads the
    entries' fields, not their events."""
    _count(
        [(entry.id, entry.event_id, entry.fields["type"], entry.fields.get("tenant_id", ""),
          entry.fields.get("session_id", "")) for entry in entries]
    )  # fmt: skip


def _count(entries: list[tuple[str, str, str, str, str]]) -> None:
    """Count (stream id, event id, type, tenant id, session id)s; events without a tenant are
    not counted."""
    keys: list[str] = []
    args: list[str | int] = []
    session_keys: list[str] = []
    session_args: list[str | int] = []
    for stream_id, event_id, event_type, tenant_id, session_id in entries:
        if not tenant_id:
            continue
        second = int(stream_id.split("-", 1)[0]) // 1000  # the event's time: replays bucket right
        # By event, not entry: the relay may publish an event again under a new id.
        keys += [
            f"analytics:seen:{event_id}",
            _key(tenant_id, "types"),
            _key(tenant_id, "sec", second),
        ]
        args += [event_type, second + BUCKET_TTL_SECONDS]
        if session_id and event_type in ("session.started", "session.ended"):
            session_keys += [_key(tenant_id, "sessions"), _key(tenant_id, "ended", session_id)]
            session_args += [len(args) // 2, session_id]
    if not keys:
        return
    keys += session_keys
    args = [_seen_ttl_seconds(), ENDED_TTL_SECONDS, len(args) // 2, *args, *session_args]
    client = redis_client()
    try:
        client.evalsha(_RECORD_SHA, len(keys), *keys, *args)
    except NoScriptError:  # Redis restarted, or its scripts flushed: nothing was applied
        client.script_load(_RECORD)
        client.evalsha(_RECORD_SHA, len(keys), *keys, *args)


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
