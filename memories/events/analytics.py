"""Per-tenant event statistics in Redis, kept by the `analytics` consumer group.

Keys (tenant `t`):
    analytics:t:types        hash   event type -> count (totals, errors = `error.occurred`)
    analytics:t:sec:<epoch>  string events in that second (by stream id time), expire after 2 min
    analytics:t:sessions     set    session ids started and not yet ended
    analytics:t:ended:<id>   string an ended session, so a late `session.started` (a taken-over
                                    entry arrives after its `session.ended`) does not revive it
    analytics:seen:<id>      string the event was counted (SET NX), so a copy counts once

One Lua script applies a read's events and acknowledges their entries for the `analytics` group
(XACK), atomically: an entry counted is never delivered to the group again, however its consumer
dies. What the markers are left to catch:
- the same event under a second stream id: the relay publishes again what a dying process
  published but had not marked (memories.events.publisher), after EVENT_RELAY_GRACE_SECONDS;
- a consumer that stalled between its read and its count while another took the entry over
  (after EVENT_CONSUMER_CLAIM_IDLE_MS) and counted it.
So a marker lives twice the longer of the two windows (`_seen_ttl_seconds`, 5 minutes by
default), not the hour it took when it had to outlive every redelivery: at 10,000 events a second
that was 36 million keys. A copy relayed later than that (after a database outage long enough to
stop the marking), a consumer stalled longer, or an entry replayed by a group reset to an old id,
is counted again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from redis.exceptions import NoScriptError

from memories.events.stream import STREAM_KEY, StreamEntry, redis_client

WINDOW_SECONDS = 60
BUCKET_TTL_SECONDS = 2 * WINDOW_SECONDS
ENDED_TTL_SECONDS = 24 * 3600
TOP_TYPES = 5

# The consumer group this module's handlers serve (memories.consumer_groups): its entries are
# acknowledged by the script that counts them.
GROUP = "analytics"

# Count a whole read of entries and acknowledge them, in one call. KEYS: the stream, then 3 per
# entry (its seen marker, its tenant's types, its second's bucket), then 2 per session start or
# end (the tenant's sessions, the ended marker of the session). ARGV: the seen TTL, the ended TTL,
# the entry count, the group, then 3 per entry (its type, its bucket's expiry, its stream id),
# then 2 per session start or end (its entry's number, from 1, and the session id). Most events
# touch no session: they pass no session keys.
_RECORD = """
local n = tonumber(ARGV[3])
local counted, fresh, by_type, by_second, expiry, ids = 0, {}, {}, {}, {}, {}
for i = 0, n - 1 do
  local k, a = 1 + i * 3, 5 + i * 3
  ids[#ids + 1] = ARGV[a + 2]
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
local k = 1 + n * 3
for a = 5 + n * 3, #ARGV, 2 do
  local entry, session = tonumber(ARGV[a]), ARGV[a + 1]
  if fresh[entry] then
    if ARGV[2 + 3 * entry] == 'session.started' then
      if redis.call('EXISTS', KEYS[k + 2]) == 0 then redis.call('SADD', KEYS[k + 1], session) end
    else
      redis.call('SREM', KEYS[k + 1], session)
      redis.call('SET', KEYS[k + 2], '1', 'EX', ARGV[2])
    end
  end
  k = k + 2
end
for i = 1, #ids, 500 do  -- in slices: a Lua call takes a bounded number of arguments
  redis.call('XACK', KEYS[1], ARGV[4], unpack(ids, i, math.min(i + 499, #ids)))
end
return counted
"""
_RECORD_SHA = hashlib.sha1(_RECORD.encode()).hexdigest()


def _key(tenant_id: str, *parts: object) -> str:
    return ":".join(["analytics", tenant_id, *map(str, parts)])


def _seen_ttl_seconds() -> int:
    """Twice the longer of: the relay's copy of an event, and an entry's takeovers (see the
    module's opening)."""
    relay_window = settings.EVENT_RELAY_GRACE_SECONDS + settings.EVENT_RELAY_INTERVAL_SECONDS
    pending_for = settings.EVENT_CONSUMER_MAX_DELIVERIES * settings.EVENT_CONSUMER_CLAIM_IDLE_MS
    return max(120, int(2 * max(10 * relay_window, pending_for / 1000)))


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
    keys: list[str] = [STREAM_KEY]
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
        args += [event_type, second + BUCKET_TTL_SECONDS, stream_id]
        if session_id and event_type in ("session.started", "session.ended"):
            session_keys += [_key(tenant_id, "sessions"), _key(tenant_id, "ended", session_id)]
            session_args += [len(args) // 3, session_id]
    if not args:
        return
    keys += session_keys
    args = [_seen_ttl_seconds(), ENDED_TTL_SECONDS, len(args) // 3, GROUP, *args, *session_args]
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
