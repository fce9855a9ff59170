"""Redis: the event stream, each tenant's copy of its own entries, the dead letters, and the
pub/sub channel names.

Every entry is added to the stream all consumer groups read and, under the same id, to its
tenant's stream, so a tenant's replay (`/v1/events`, SSE's Last-Event-ID) reads its own entries
only, however many other tenants write, and a position (a stream id) means the same in both.
Events without a tenant go to the `system` one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cache
from typing import Any, cast

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

STREAM_KEY = "memory:events"
DEAD_LETTER_KEY = "memory:events:dead"
# The tenant streams that exist (their keys), for the trim.
TENANT_STREAMS_KEY = "memory:events:tenant-streams"
# Per tenant stream: the id below which entries may have been trimmed from it. A position below
# it cannot be replayed; so is one below INDEXED_SINCE_KEY, the first entry tenant streams hold.
TENANT_TRIMMED_KEY = "memory:events:tenant-trimmed"
INDEXED_SINCE_KEY = "memory:events:tenant-indexed-since"
# The ids of entries dropped before every consumer group had them (see publisher.trim_stream).
DROPPED_KEY = "memory:events:dropped"
DROPPED_IDS_KEPT = 10_000
# Pub/sub: the ids of requests that just finished (comma-separated), for callers waiting on them
# (memories.request_waits). Fire and forget: a waiter that misses one ends at its own timeout.
REQUESTS_DONE_CHANNEL = "memory:requests:done"


def tenant_stream_key(tenant_id: str) -> str:
    return f"{STREAM_KEY}:tenant:{tenant_id or 'system'}"


def replayable_from(tenant_id: str, *, client: redis.Redis | None = None) -> tuple[int, int]:
    """The oldest position from which the tenant's stream replays without a gap: a position
    before it (trimmed since, or older than tenant streams) may have missed entries."""
    client = client or redis_client()
    with client.pipeline(transaction=False) as pipe:
        pipe.get(INDEXED_SINCE_KEY)
        pipe.hget(TENANT_TRIMMED_KEY, tenant_stream_key(tenant_id))
        indexed, trimmed = pipe.execute()
    return max(stream_id_order(indexed or "0-0"), stream_id_order(trimmed or "0-0"))


def stream_id_order(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (ids compare by milliseconds, then sequence)."""
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def redis_client() -> redis.Redis:
    """A shared client (its pool is thread-safe) for the configured Redis."""
    return _client(settings.REDIS_URL)


def pubsub_channel(channel: str, tenant_id: str) -> str:
    """The Redis channel behind a client-facing channel name.

    Topic names are chosen by clients, so two tenants may pick the same one: in Redis a topic
    channel is namespaced by tenant, so no tenant ever hears another's topic.
    """
    if channel.startswith("topic:"):
        return f"tenant:{tenant_id}:{channel}"
    return channel


class StreamEntry:
    """One entry read from the stream: its id, its fields as stored (the event's JSON text,
    `type`, `tenant_id`, `user_id`, `session_id`, `event_id`), and the event, decoded on first
    use. It unpacks as (stream id, event), the pair a handler of one entry takes; a handler of a
    whole read that needs only the fields or the JSON text never pays for decoding it (three
    groups decoding every event of a bulk write cost more than their work)."""

    __slots__ = ("id", "fields", "_event")

    def __init__(self, entry_id: str, fields: dict[str, str]) -> None:
        self.id = entry_id
        self.fields = fields
        self._event: dict[str, Any] | None = None

    @property
    def event(self) -> dict[str, Any]:
        if self._event is None:
            self._event = json.loads(self.fields["event"])
        return self._event

    @property
    def event_id(self) -> str:
        # Entries published before the field was added carry it in the event only.
        return self.fields.get("event_id") or self.event["event_id"]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.id, self.event))


def parse_entry(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry as the API shows it: the event, with its stream id as `id`."""
    return {"id": entry_id, **json.loads(fields["event"])}


def stream_id_for_time(moment: datetime, *, end: bool = False) -> str:
    """The stream id bound for a moment (stream ids start with milliseconds since the epoch)."""
    # Before 1970 (a `since` far in the past): from the first id there can be, not a negative one.
    millis = max(0, int(moment.timestamp() * 1000))
    return f"{millis}-{'18446744073709551615' if end else '0'}"


def read_range(
    *,
    start: str = "-",
    end: str = "+",
    count: int = 1000,
    client: redis.Redis | None = None,
    key: str = STREAM_KEY,
) -> list[tuple[str, dict[str, str]]]:
    reply = (client or redis_client()).xrange(key, min=start, max=end, count=count)
    # redis-py types the reply for any client (`bytes | str`, or None); this one decodes
    # responses, and XRANGE always answers a list of (id, fields).
    return cast(list[tuple[str, dict[str, str]]], reply)


def requests_finished_announce(
    request_ids: list[str], *, also: Callable[[Any], None] | None = None
) -> None:
    """Tell waiting callers these requests finished (call it after the commit that finished
    them); `also(pipeline)` adds commands to the same round trip. A Redis failure is logged, not
    raised: the request is finished all the same."""
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            pipe.publish(REQUESTS_DONE_CHANNEL, ",".join(request_ids))
            if also is not None:
                also(pipe)
            pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not announce finished requests %s: %s", request_ids, exc)
