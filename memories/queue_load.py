"""How much work waits: the depth of each Celery lane in Redis and the `pending` requests in
PostgreSQL, read by admission control (`backpressure`) and by `/metrics` (`QueueDepthCollector`);
and what the broker still holds of the requests' doorbells, read by the sweeper (`broker_view`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection
from prometheus_client.core import GaugeMetricFamily

from memories import timeseries
from memories.dispatch import Queue, lane_for
from memories.events.stream import DEAD_LETTER_KEY, redis_client
from memories.models import MemoryRequest, OutboxEvent
from memoryproject.celery import SENT_AT_HEADER

# Kombu's Redis transport keeps a lane in a list named after it, plus one list per priority step
# when messages carry a priority; count them all.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def lane_depths() -> dict[str, int]:
    """Messages waiting in each lane's Redis lists (one pipelined round trip of LLENs)."""
    client = redis_client()
    with client.pipeline(transaction=False) as pipe:
        for lane in Queue:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.llen(f"{lane.value}{suffix}")
        lengths = pipe.execute()
    steps = len(_PRIORITY_SUFFIXES)
    depths = {lane.value: sum(lengths[i * steps : (i + 1) * steps]) for i, lane in enumerate(Queue)}
    # Every reading (admission control, a metrics scrape, the sweeper, the dashboard) is a
    # sample for the dashboard's chart: at most one write a second per process.
    timeseries.lane_depths_sampled(client, depths)
    return depths


# kombu keeps each message a worker fetched and has not acknowledged in a hash (delivery tag ->
# [message, exchange, routing key]), and when it was fetched in a sorted set; both by these names.
_UNACKED_KEY = "unacked"
_UNACKED_INDEX_KEY = "unacked_index"


@dataclass(frozen=True)
class BrokerView:
    """What the broker holds of the lanes, at one instant.

    `empty`: lanes with no message queued. `oldest_sent`: when the oldest message queued in a
    lane was sent (None when the lane is empty, or when that message carries no stamp: then the
    lane's order tells nothing). `held_until`: per task id (a request's id), the latest moment at
    which a worker that fetched one of its messages is due to run it: its fetch, or the end of its
    countdown.
    """

    empty: frozenset[str]
    oldest_sent: dict[str, datetime | None]
    held_until: dict[str, datetime]


def broker_view() -> BrokerView:
    """Read the oldest message of each lane and the unacknowledged ones, atomically (one MULTI:
    a message is either queued or fetched in what this sees, never neither, unless a worker holds
    it between its BRPOP and its record of the fetch)."""
    client = redis_client()
    with client.pipeline(transaction=True) as pipe:
        for lane in Queue:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.lindex(
                    f"{lane.value}{suffix}", -1
                )  # kombu LPUSHes and BRPOPs: right is oldest
        pipe.hgetall(_UNACKED_KEY)
        pipe.zrange(_UNACKED_INDEX_KEY, 0, -1, withscores=True)
        *heads, unacked, fetched = pipe.execute()
    steps = len(_PRIORITY_SUFFIXES)
    empty: set[str] = set()
    oldest_sent: dict[str, datetime | None] = {}
    for i, lane in enumerate(Queue):
        lane_heads = [head for head in heads[i * steps : (i + 1) * steps] if head is not None]
        if not lane_heads:
            empty.add(lane.value)
            oldest_sent[lane.value] = None
            continue
        stamps = [_sent_at(_envelope(head)) for head in lane_heads]
        known = [stamp for stamp in stamps if stamp is not None]
        oldest_sent[lane.value] = min(known) if len(known) == len(stamps) else None
    fetched_at = {_text(tag): score for tag, score in fetched}
    held_until: dict[str, datetime] = {}
    for tag, raw in unacked.items():
        try:
            message = json.loads(raw)[0]
            task_id = str(message["headers"]["id"])
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # not a task message: nothing of a request's
        moments = [datetime.fromtimestamp(fetched_at.get(_text(tag), 0.0), UTC)]
        if eta := _eta(message):
            moments.append(eta)
        latest = max(moments)
        if task_id not in held_until or held_until[task_id] < latest:
            held_until[task_id] = latest
    return BrokerView(empty=frozenset(empty), oldest_sent=oldest_sent, held_until=held_until)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _envelope(raw: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _sent_at(message: dict[str, Any] | None) -> datetime | None:
    """The stamp memoryproject.celery puts on every message as it is published."""
    headers = (message or {}).get("headers")
    stamp = headers.get(SENT_AT_HEADER) if isinstance(headers, dict) else None
    if not isinstance(stamp, int | float):
        return None
    return datetime.fromtimestamp(stamp, UTC)


def _eta(message: dict[str, Any]) -> datetime | None:
    """A countdown's end (Celery's `eta` header, ISO 8601), as an aware datetime."""
    eta = message.get("headers", {}).get("eta")
    try:
        moment = datetime.fromisoformat(eta) if isinstance(eta, str) else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


# By hand: the ORM's aggregate cost more to build than PostgreSQL took to count (0.5 vs 0.1 ms).
_PENDING_BY_KIND_SQL = f"""
    SELECT kind, priority, count(*) FROM {MemoryRequest._meta.db_table}
    WHERE status = 'pending' GROUP BY kind, priority
"""


_TENANT_PENDING_BY_KIND_SQL = f"""
    SELECT kind, priority, count(*) FROM {MemoryRequest._meta.db_table}
    WHERE status = 'pending' AND tenant_id = %s GROUP BY kind, priority
"""


def pending_by_lane(*, tenant_id: str | None = None) -> dict[str, int]:
    """Requests waiting for a worker (of one tenant, or all), by the lane their task is sent on:
    a lost task leaves its request pending, so this counts what Redis may no longer hold."""
    counts = {lane.value: 0 for lane in Queue}
    with connection.cursor() as cursor:
        if tenant_id is None:
            cursor.execute(_PENDING_BY_KIND_SQL)
        else:
            cursor.execute(_TENANT_PENDING_BY_KIND_SQL, [tenant_id])
        for kind, priority, count in cursor.fetchall():
            counts[lane_for(kind, priority).value] += count
    return counts


def pending_requests() -> int:
    return sum(pending_by_lane().values())


class QueueDepthCollector:
    """Queue depth per lane and pending requests, read at scrape time (cheap: LLEN and an index)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("queue_depth", "Messages waiting per lane", labels=["lane"])
        for lane, value in lane_depths().items():
            depth.add_metric([lane], value)
        yield depth
        pending = GaugeMetricFamily("memory_requests_pending", "Requests in status pending")
        pending.add_metric([], pending_requests())
        yield pending
        count, oldest = outbox_backlog()
        unpublished = GaugeMetricFamily(
            "event_outbox_unpublished", "Outbox events committed and not yet on the stream"
        )
        unpublished.add_metric([], count)
        yield unpublished
        age = GaugeMetricFamily(
            "event_outbox_oldest_unpublished_seconds",
            "Age of the oldest outbox event not yet on the stream (0: none)",
        )
        age.add_metric([], oldest)
        yield age
        dead = GaugeMetricFamily(
            "event_dead_letters",
            f"Entries in {DEAD_LETTER_KEY}: events a consumer group gave up on",
        )
        dead.add_metric([], redis_client().xlen(DEAD_LETTER_KEY))
        yield dead


def outbox_backlog() -> tuple[int, float]:
    """How many outbox events wait to be published, and the oldest one's age in seconds: after
    commit each is published at once, so a backlog that lasts means Redis refused them and beat's
    relay has not caught up (both are reads of the partial index `outbox_unpublished`)."""
    waiting = OutboxEvent.objects.filter(published_at__isnull=True)
    count = waiting.count()
    first = waiting.order_by("id").values_list("created_at", flat=True).first()
    age = (datetime.now(UTC) - first).total_seconds() if first else 0.0
    return count, max(age, 0.0)
