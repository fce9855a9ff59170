"""The one publisher: events are recorded with the change, and published after commit."""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import time
from datetime import timedelta
from typing import Any, cast

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from redis.exceptions import NoScriptError, ResponseError

from memories import dispatch, timeseries
from memories.background import ProcessThread
from memories.events.stream import (
    DROPPED_IDS_KEPT,
    DROPPED_KEY,
    INDEXED_SINCE_KEY,
    STREAM_KEY,
    TENANT_STREAMS_KEY,
    TENANT_TRIMMED_KEY,
    pubsub_channel,
    read_range,
    redis_client,
    stream_id_order,
    tenant_stream_key,
)
from memories.metrics import EVENTS_DROPPED, EVENTS_PUBLISHED, READ_EVENTS_LOST
from memories.rows import insert_rows, json_bytes

logger = logging.getLogger(__name__)


# Up to this many events go in one multi-row INSERT (one round trip); more by binary COPY, which
# costs a round trip for the ids first but far less per row.
_INSERT_MAX = 50


def record(event: dict[str, Any]) -> None:
    """Record one event in the current transaction; it is published once the transaction commits."""
    record_many([event])


def record_many(events: list[dict[str, Any]]) -> None:
    """Record events in the current transaction (one INSERT), publish them after commit.

    A rolled-back transaction takes its events with it, so nothing is published for a change that
    did not happen; a commit followed by a failed publish leaves the rows for the relay.
    """
    if not events:
        return
    ids = _insert_outbox(events) if len(events) <= _INSERT_MAX else _copy_outbox(events)
    if len(ids) > settings.EVENT_INLINE_PUBLISH_MAX:
        # A bulk write should not wait for its thousand events to reach Redis: the batch lane
        # publishes them (and the relay still catches whatever that misses).
        transaction.on_commit(lambda: _defer(ids), robust=True)
    else:
        transaction.on_commit(lambda: _publish_committed(ids, events), robust=True)


def _publish_committed(ids: list[int], events: list[dict[str, Any]]) -> None:
    """Right after commit: publish the events this process holds, then have their rows marked.
    No read of the outbox first; the relay only looks at rows older than
    EVENT_RELAY_GRACE_SECONDS, so the two do not race (if this process dies before the rows are
    marked, the relay sends again: delivery is at-least-once, every event carries its
    `event_id`)."""
    _marks.add(ids, _send(events))


class _PublishedMarks:
    """Marks published outbox rows from one background thread per process, many rows a statement.

    Marking inline would cost every write a second statement and commit after its own, on the
    request's time; here the response goes out first, and under load one UPDATE marks the rows
    of many writes. Rows not yet marked when a process dies are sent again by the relay.
    """

    # How long the thread waits after the first unmarked row before it writes, to gather more:
    # at a hundred jobs a second, ten to a statement instead of one. Far below the relay's grace
    # (EVENT_RELAY_GRACE_SECONDS), so the relay never sends a row that is about to be marked.
    GATHER_SECONDS = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._stream_ids: list[str] = []
        self._wake = threading.Event()
        self._thread = ProcessThread(self._run, name="outbox-marks")

    def add(self, ids: list[int], stream_ids: list[str]) -> None:
        with self._lock:
            self._ids += ids
            self._stream_ids += stream_ids
        self._thread.ensure_running()
        self._wake.set()

    def flush(self) -> None:
        """Mark every row handed in so far (the thread's step; also at exit)."""
        with self._lock:
            ids, stream_ids = self._ids, self._stream_ids
            self._ids, self._stream_ids = [], []
        if not ids:
            return
        try:
            _mark_published(ids, stream_ids)
        except Exception:  # unmarked rows are the relay's to send again, after its grace period
            logger.exception("could not mark %d published outbox rows", len(ids))
        finally:
            connection.close()  # this thread's connection, back to the pool

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.GATHER_SECONDS)
            self._wake.clear()
            self.flush()


_marks = _PublishedMarks()
atexit.register(_marks.flush)


def record_read(event: dict[str, Any]) -> None:
    """Publish the event of a read (a search): straight to the stream and its channels, in one
    Redis round trip, with no outbox row. A read changes nothing, so there is no transaction
    for its event to join, and a write and a commit per search would cost more than the search.
    The price: with Redis down the event is lost (logged and counted), not relayed later."""
    try:
        _send([event])
    except Exception:
        logger.warning("could not publish a %s event; dropped", event["event_type"], exc_info=True)
        READ_EVENTS_LOST.inc()


def flush_published_marks() -> None:
    """Mark the rows published so far now. For exits that skip atexit: a Celery pool process
    leaves through os._exit (tasks.events calls this on its shutdown signal)."""
    _marks.flush()


def _defer(ids: list[int]) -> None:
    try:
        dispatch.events_publish_send(outbox_ids=ids)
    except Exception:
        logger.exception("could not hand %d events to the batch lane; the relay will", len(ids))


def _insert_outbox(events: list[dict[str, Any]]) -> list[int]:
    """A few events in one INSERT, their ids returned in order."""
    from memories.models import OutboxEvent

    now = timezone.now()
    return insert_rows(
        OutboxEvent,
        [
            {
                "event_type": event["event_type"],
                "payload": event,
                "created_at": now,
                "stream_id": "",
            }
            for event in events
        ],
        returning="id",
    )


def _copy_outbox(events: list[dict[str, Any]]) -> list[int]:
    """Many events in one binary COPY (bulk writes record one per item); ids are drawn from the
    table's sequence first, since COPY returns none."""
    from psycopg.types.json import Json

    from memories.models import OutboxEvent

    table = OutboxEvent._meta.db_table
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
            [table, len(events)],
        )
        ids = [row[0] for row in cursor.fetchall()]
        columns = "id, event_type, payload, created_at, stream_id"
        statement = f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)"
        with cursor.cursor.copy(statement) as copy:
            copy.set_types(["int8", "varchar", "json", "timestamptz", "varchar"])
            for outbox_id, event in zip(ids, events, strict=True):
                copy.write_row(
                    (outbox_id, event["event_type"], Json(event, dumps=json_bytes), now, "")
                )
    return ids


def publish_outbox(*, ids: list[int] | None = None, limit: int = 1000) -> int:
    """Publish unpublished outbox rows (these ids, or the oldest `limit`) to the stream and their
    channels, then mark them. Rows another publisher holds are skipped. With no ids (the relay),
    only rows older than EVENT_RELAY_GRACE_SECONDS: younger ones are being published right after
    their commit.

    The payloads are read as the JSON text they were written as and sent on as they are (no
    model instance, no decoding into a dict and encoding again): a bulk write's thousand events
    spent most of this call's CPU there."""
    from memories.models import OutboxEvent

    param: Any
    if ids is not None:
        which, param = "id = ANY(%s::bigint[])", _array_text(ids)
    else:
        grace = timedelta(seconds=settings.EVENT_RELAY_GRACE_SECONDS)
        which, param = "created_at < %s", timezone.now() - grace
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT id, payload::text FROM {OutboxEvent._meta.db_table}
                WHERE published_at IS NULL AND {which}
                ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
            [param, limit],
        )
        rows = cursor.fetchall()
        if not rows:
            return 0
        stream_ids = _send_encoded([(text, orjson.loads(text)) for _, text in rows])
        _mark_published([row[0] for row in rows], stream_ids)
    return len(rows)


def _array_text(values: list[Any]) -> str:
    """Ids (numbers, stream ids) as one PostgreSQL array literal: one parameter to send, where a
    list is quoted value by value in Python (the client-side binding Django's cursor uses)."""
    return "{" + ",".join(map(str, values)) + "}"


def _mark_published(ids: list[int], stream_ids: list[str]) -> None:
    from memories.models import OutboxEvent

    # One statement for the whole page (Django's bulk_update builds a CASE per row).
    with connection.cursor() as cursor:
        cursor.execute(
            f"""UPDATE {OutboxEvent._meta.db_table} AS o
                SET published_at = %s, stream_id = v.stream_id
                FROM unnest(%s::bigint[], %s::text[]) AS v(id, stream_id)
                WHERE o.id = v.id""",
            [timezone.now(), _array_text(ids), _array_text(stream_ids)],
        )
    EVENTS_PUBLISHED.inc(len(ids))


# XADD each event to the stream and its tenant's stream, and PUBLISH it on its channels with the
# new stream id: a whole list of events in one call (one round trip, one script run; a call per
# event cost more than the event). KEYS: the stream, the set of tenant streams, the
# indexed-since key, then each event's tenant stream and channels. ARGV: per event, its channel
# count, JSON, type, tenant_id, user_id, session_id, event_id (on the stream the consumer groups
# read, so that they need not decode the JSON for it). Returns the stream ids, in order.
_XADD_AND_PUBLISH = """
local ids, known, k = {}, {}, 4
for a = 1, #ARGV, 7 do
  local tenant_stream, channels = KEYS[k], tonumber(ARGV[a])
  local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[a + 1], 'type', ARGV[a + 2],
      'tenant_id', ARGV[a + 3], 'user_id', ARGV[a + 4], 'session_id', ARGV[a + 5],
      'event_id', ARGV[a + 6])
  redis.call('XADD', tenant_stream, id, 'event', ARGV[a + 1], 'type', ARGV[a + 2],
      'user_id', ARGV[a + 4], 'session_id', ARGV[a + 5])
  if not known[tenant_stream] then
    redis.call('SADD', KEYS[2], tenant_stream)
    known[tenant_stream] = true
  end
  if channels > 0 then
    local message = '{"id":"' .. id .. '","event":' .. ARGV[a + 1] .. '}'
    for c = k + 1, k + channels do redis.call('PUBLISH', KEYS[c], message) end
  end
  k = k + 1 + channels
  ids[#ids + 1] = id
end
if #ids > 0 then redis.call('SETNX', KEYS[3], ids[1]) end
return ids
"""


_XADD_AND_PUBLISH_SHA = hashlib.sha1(_XADD_AND_PUBLISH.encode()).hexdigest()


def _send(events: list[dict[str, Any]]) -> list[str]:
    """Add the events to the stream and their channels; returns their stream ids, in order."""
    return _send_encoded([(json_bytes(event), event) for event in events])


def _send_encoded(events: list[tuple[str | bytes, dict[str, Any]]]) -> list[str]:
    """`_send` for events given with their JSON (what is stored and sent) as well.

    One round trip: the script runs by its SHA. (redis-py's registered scripts ask Redis whether
    the script exists first, a second round trip.) When Redis does not know the script
    (restarted, or its scripts flushed) nothing was applied: load it and send again.
    """
    if not events:
        return []
    keys: list[str] = [STREAM_KEY, TENANT_STREAMS_KEY, INDEXED_SINCE_KEY]
    args: list[str | bytes | int] = []
    for text, event in events:
        source = event["source"]
        tenant_id = source["tenant_id"]
        keys.append(tenant_stream_key(tenant_id))
        keys += [pubsub_channel(channel, tenant_id) for channel in event["channels"]]
        args += [len(event["channels"]), text, event["event_type"], tenant_id,
                 source["user_id"], source["session_id"], event["event_id"]]  # fmt: skip
    client = redis_client()
    try:
        return _send_by_sha(client, keys, args, events, count=True)
    except NoScriptError:
        client.script_load(_XADD_AND_PUBLISH)
        # A failed pipeline still ran its other commands: the events were counted once.
        return _send_by_sha(client, keys, args, events, count=False)


def _send_by_sha(
    client: Any,
    keys: list[str],
    args: list[str | bytes | int],
    events: list[tuple[str | bytes, dict[str, Any]]],
    *,
    count: bool,
) -> list[str]:
    """The script by its SHA; with `count`, the dashboard's events per second counted in the
    same round trip (memories.timeseries)."""
    if not count:
        return cast(list[str], client.evalsha(_XADD_AND_PUBLISH_SHA, len(keys), *keys, *args))
    with client.pipeline(transaction=False) as pipe:
        pipe.evalsha(_XADD_AND_PUBLISH_SHA, len(keys), *keys, *args)
        timeseries.events_count(pipe, [event for _, event in events])
        return cast(list[str], pipe.execute()[0])


def relay_unpublished() -> int:
    """Beat's safety net: publish what the on-commit path could not."""
    try:
        return publish_outbox()
    except Exception:
        logger.exception("event relay failed; will retry on the next beat")
        return 0


def trim_stream() -> int:
    """Trim the stream; returns the entries removed. Beat runs it every
    EVENT_TRIM_INTERVAL_SECONDS.

    Retention: entries older than EVENT_STREAM_MAX_AGE_SECONDS go, but only those every consumer
    group has acknowledged: a stopped consumer finds, when it starts again, all it has not
    processed. Safety: past EVENT_STREAM_MAXLEN entries the oldest go even if unacknowledged,
    so a consumer stopped for good cannot fill Redis; those are counted (events_dropped_total),
    logged, and their ids kept in DROPPED_KEY (the newest DROPPED_IDS_KEPT) for the operator.
    """
    client = redis_client()
    keep_from = _oldest_unacknowledged(client)
    removed = 0
    excess = client.xlen(STREAM_KEY) - settings.EVENT_STREAM_MAXLEN
    if excess > 0:
        dropping = [entry_id for entry_id, _ in read_range(count=excess, client=client)]
        lost = [i for i in dropping if keep_from is not None and stream_id_order(i) >= keep_from]
        removed += client.xtrim(STREAM_KEY, maxlen=settings.EVENT_STREAM_MAXLEN, approximate=False)
        if lost:
            EVENTS_DROPPED.inc(len(lost))
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(DROPPED_KEY, *lost)
                pipe.ltrim(DROPPED_KEY, 0, DROPPED_IDS_KEPT - 1)
                pipe.execute()
            logger.error(
                "event stream over EVENT_STREAM_MAXLEN (%d): dropped %d entries a consumer group "
                "had not acknowledged, %s to %s (ids in %s)",
                settings.EVENT_STREAM_MAXLEN, len(lost), lost[0], lost[-1], DROPPED_KEY,
            )  # fmt: skip
    cutoff_ms = int((timezone.now().timestamp() - settings.EVENT_STREAM_MAX_AGE_SECONDS) * 1000)
    cut = (cutoff_ms, 0) if keep_from is None else min((cutoff_ms, 0), keep_from)
    # Exact, unlike "~", which keeps whole old nodes.
    removed += client.xtrim(STREAM_KEY, minid=f"{cut[0]}-{cut[1]}", approximate=False)
    _trim_tenant_streams(client, cutoff=f"{cutoff_ms}-0")
    return removed


def _trim_tenant_streams(client: Any, *, cutoff: str) -> None:
    """Each tenant's stream keeps EVENT_STREAM_MAX_AGE_SECONDS, at most EVENT_STREAM_MAXLEN
    entries (no consumer group reads them: only replay). Where entries go, the position below
    which the tenant's replay would have a gap is recorded (TENANT_TRIMMED_KEY)."""
    for key in client.smembers(TENANT_STREAMS_KEY):
        trimmed_below = None
        excess = client.xlen(key) - settings.EVENT_STREAM_MAXLEN
        if excess > 0:
            dropping = read_range(count=excess, client=client, key=key)
            client.xtrim(key, maxlen=settings.EVENT_STREAM_MAXLEN, approximate=False)
            trimmed_below = dropping[-1][0]  # a position at it saw every entry dropped
        if client.xtrim(key, minid=cutoff, approximate=False):
            trimmed_below = max(trimmed_below or "0-0", cutoff, key=stream_id_order)
        if trimmed_below is not None:
            client.hset(TENANT_TRIMMED_KEY, key, trimmed_below)


def _oldest_unacknowledged(client: Any) -> tuple[int, int] | None:
    """The oldest entry some consumer group still needs: its oldest pending entry (delivered,
    not acknowledged), or the first it has not been delivered; None when no group exists."""
    oldest: tuple[int, int] | None = None
    try:
        groups = client.xinfo_groups(STREAM_KEY)
    except ResponseError:  # no stream yet
        return None
    for group in groups:
        delivered = stream_id_order(group["last-delivered-id"])
        needed = (delivered[0], delivered[1] + 1)
        if group["pending"]:
            summary = client.xpending(STREAM_KEY, group["name"])
            needed = min(needed, stream_id_order(summary["min"]))
        oldest = needed if oldest is None else min(oldest, needed)
    return oldest


def outbox_purge() -> int:
    """Delete outbox rows published more than OUTBOX_RETENTION_SECONDS ago; returns how many."""
    from memories.models import OutboxEvent

    cutoff = timezone.now() - timedelta(seconds=settings.OUTBOX_RETENTION_SECONDS)
    deleted, _ = OutboxEvent.objects.filter(published_at__lt=cutoff).delete()
    return deleted
