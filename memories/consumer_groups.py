"""The consumer groups of the event stream and the handler each runs: the entry point that wires
`memories.events.consumers.StreamConsumer` to the services (as urls.py wires paths to views)."""

from __future__ import annotations

from typing import Any

from memories.audit import audit_record
from memories.events.analytics import analytics_record
from memories.events.consumers import Handler, StreamConsumer
from webhooks.services import webhook_deliveries_create_for_event

GROUPS = ("audit", "analytics", "webhooks")


def _webhooks_record(stream_id: str, event: dict[str, Any]) -> None:
    webhook_deliveries_create_for_event(stream_id=stream_id, event=event)


HANDLERS: dict[str, Handler] = {
    "audit": audit_record,
    "analytics": analytics_record,
    "webhooks": _webhooks_record,
}


def consumer_for(group: str, **options: Any) -> StreamConsumer:
    """A consumer of one of GROUPS with its handler; options override StreamConsumer's fields."""
    return StreamConsumer(group=group, handler=HANDLERS[group], **options)
