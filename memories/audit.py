"""The audit log: every event on the stream, appended once (the `audit` consumer group's work)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connection

from memories.events.stream import StreamEntry
from memories.models import AuditLogEntry


def audit_record(stream_id: str, event: dict[str, Any]) -> None:
    """Append the event to the audit log; an event seen again (redelivered, or published twice
    under another stream id) hits the unique event id."""
    AuditLogEntry.objects.bulk_create([_entry(stream_id, event)], ignore_conflicts=True)


def audit_record_many(entries: list[StreamEntry]) -> None:
    """`audit_record` for a whole read of the stream in one INSERT (a bulk write's events). The
    events go as one JSON document that PostgreSQL unpacks, made of their JSON texts as they are
    on the stream: no decoding in Python, no encoding again, no quoting value by value."""
    document = ",".join(f'{{"s":"{entry.id}","e":{entry.fields["event"]}}}' for entry in entries)
    # Bound server-side: the megabyte travels as a parameter, where Django's cursor (client-side
    # binding) would scan and quote it into the statement in Python first.
    connection.ensure_connection()
    assert connection.connection is not None
    with connection.connection.cursor() as cursor:
        cursor.execute(_INSERT_MANY.format(table=AuditLogEntry._meta.db_table), [f"[{document}]"])


_INSERT_MANY = """
INSERT INTO {table} (stream_id, event_id, event_type, tenant_id, user_id, session_id,
                     occurred_at, payload, recorded_at)
SELECT x->>'s', (x->'e'->>'event_id')::uuid, x->'e'->>'event_type',
       NULLIF(x->'e'->'source'->>'tenant_id', '')::uuid,
       NULLIF(x->'e'->'source'->>'user_id', '')::uuid,
       COALESCE(x->'e'->'source'->>'session_id', ''), (x->'e'->>'timestamp')::timestamptz,
       x->'e', now()
FROM jsonb_array_elements(%s::jsonb) AS x
ON CONFLICT (event_id) DO NOTHING
"""


def _entry(stream_id: str, event: dict[str, Any]) -> AuditLogEntry:
    source = event.get("source") or {}
    return AuditLogEntry(
        stream_id=stream_id,
        event_id=event["event_id"],
        event_type=event["event_type"],
        tenant_id=source.get("tenant_id") or None,
        user_id=source.get("user_id") or None,
        session_id=source.get("session_id") or "",
        occurred_at=datetime.fromisoformat(event["timestamp"]),
        payload=event,
    )
