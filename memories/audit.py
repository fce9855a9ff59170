"""The audit log: every event on the stream, appended once (the `audit` consumer group's work)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from memories.models import AuditLogEntry


def audit_record(stream_id: str, event: dict[str, Any]) -> None:
    """Append the event to the audit log; an event seen again (redelivered, or published twice
    under another stream id) hits the unique event id."""
    source = event.get("source") or {}
    AuditLogEntry.objects.bulk_create(
        [
            AuditLogEntry(
                stream_id=stream_id,
                event_id=event["event_id"],
                event_type=event["event_type"],
                tenant_id=source.get("tenant_id") or None,
                user_id=source.get("user_id") or None,
                session_id=source.get("session_id") or "",
                occurred_at=datetime.fromisoformat(event["timestamp"]),
                payload=event,
            )
        ],
        ignore_conflicts=True,
    )
