"""The one publisher: events are recorded with the change, and published after commit."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memories.events.stream import STREAM_KEY, entry_fields, pubsub_channel, redis_client
from memories.metrics import EVENTS_PUBLISHED

logger = logging.getLogger(__name__)


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
    if len(events) == 1:
        from memories.models import OutboxEvent

        ids = [OutboxEvent.objects.create(event_type=events[0]["event_type"], payload=events[0]).id]
    else:
        ids = _copy_outbox(events)
    if len(ids) > settings.EVENT_INLINE_PUBLISH_MAX:
        # A bulk write should not wait for its thousand events to reach Redis: the batch lane
        # publishes them (and the relay still catches whatever that misses).
        from tasks.events import publish_events

        transaction.on_commit(lambda: _defer(publish_events, ids), robust=True)
    else:
        transaction.on_commit(lambda: publish_outbox(ids=ids), robust=True)


def _defer(task: Any, ids: list[int]) -> None:
    try:
        task.apply_async(args=[ids], queue="batch")
    except Exception:
        logger.exception("could not hand %d events to the batch lane; the relay will", len(ids))


def _copy_outbox(events: list[dict[str, Any]]) -> list[int]:
    """Many events in one binary COPY (bulk writes record one per item); ids are drawn from the
    table's sequence first, since COPY returns none."""
    from psycopg.types.json import Jsonb

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
            copy.set_types(["int8", "varchar", "jsonb", "timestamptz", "varchar"])
            for outbox_id, event in zip(ids, events, strict=True):
                copy.write_row((outbox_id, event["event_type"], Jsonb(event), now, ""))
    return ids


def publish_outbox(*, ids: list[int] | None = None, limit: int = 1000) -> int:
    """Publish unpublished outbox rows (these ids, or the oldest `limit`) to the stream and their
    channels, then mark them. Rows another publisher holds are skipped, so each is sent once."""
    from memories.models import OutboxEvent

    with transaction.atomic():
        pending = OutboxEvent.objects.select_for_update(skip_locked=True).filter(
            published_at__isnull=True
        )
        if ids is not None:
            pending = pending.filter(id__in=ids)
        rows = list(pending.order_by("id")[:limit])
        if not rows:
            return 0
        stream_ids = _send(rows)
        # One statement for the whole page (Django's bulk_update builds a CASE per row).
        with connection.cursor() as cursor:
            cursor.execute(
                f"""UPDATE {OutboxEvent._meta.db_table} AS o
                    SET published_at = %s, stream_id = v.stream_id
                    FROM unnest(%s::bigint[], %s::text[]) AS v(id, stream_id)
                    WHERE o.id = v.id""",
                [timezone.now(), [row.id for row in rows], stream_ids],
            )
    EVENTS_PUBLISHED.inc(len(rows))
    return len(rows)


def _send(rows: list) -> list[str]:
    client = redis_client()
    # XADD first, in one round trip: the stream ids are the events' cursors, carried on pub/sub.
    with client.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.xadd(
                STREAM_KEY,
                entry_fields(row.payload),
                maxlen=settings.EVENT_STREAM_MAXLEN,
                approximate=True,
            )
        stream_ids = pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        for row, stream_id in zip(rows, stream_ids, strict=True):
            message = {"id": stream_id, "event": row.payload}
            body = json.dumps(message, separators=(",", ":"))
            tenant_id = row.payload["source"]["tenant_id"]
            for channel in row.payload["channels"]:
                pipe.publish(pubsub_channel(channel, tenant_id), body)
        pipe.execute()
    return stream_ids


def relay_unpublished() -> int:
    """Beat's safety net: publish what the on-commit path could not."""
    try:
        return publish_outbox()
    except Exception:
        logger.exception("event relay failed; will retry on the next beat")
        return 0


def trim_stream() -> int:
    """Drop stream entries older than EVENT_STREAM_MAX_AGE_SECONDS (MAXLEN caps the length)."""
    cutoff_ms = int((timezone.now().timestamp() - settings.EVENT_STREAM_MAX_AGE_SECONDS) * 1000)
    # Exact, unlike the MAXLEN ~ on writes: it runs once a minute, and "~" keeps whole old nodes.
    return redis_client().xtrim(STREAM_KEY, minid=f"{cutoff_ms}-0", approximate=False)
