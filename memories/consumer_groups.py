"""The consumer groups of the event stream and the handler each runs: the entry point that wires
`memories.events.consumers.StreamConsumer` to the services (as urls.py wires paths to views)."""

from __future__ import annotations

from typing import Any

from memories.audit import audit_record, audit_record_many
from memories.events.analytics import GROUP as ANALYTICS_GROUP
from memories.events.analytics import analytics_record, analytics_record_many
from memories.events.consumers import Handler, ManyHandler, StreamConsumer
from webhooks.services import (
    webhook_deliveries_create_for_event,
    webhook_deliveries_create_for_events,
)

GROUPS = ("audit", ANALYTICS_GROUP, "webhooks")


def _webhooks_record(stream_id: str, event: dict[str, Any]) -> None:
    webhook_deliveries_create_for_event(stream_id=stream_id, event=event)


HANDLERS: dict[str, Handler] = {
    "audit": audit_record,
    ANALYTICS_GROUP: analytics_record,
    "webhooks": _webhooks_record,
}


# Groups whose work for a whole read is one statement rather than one per entry.
MANY_HANDLERS: dict[str, ManyHandler] = {
    "audit": audit_record_many,
    ANALYTICS_GROUP: analytics_record_many,
    "webhooks": webhook_deliveries_create_for_events,
}


def consumer_for(group: str, **options: Any) -> StreamConsumer:
    """A consumer of one of GROUPS with its handlers; options override StreamConsumer's fields."""
    options.setdefault("handle_many", MANY_HANDLERS.get(group))
    return StreamConsumer(group=group, handler=HANDLERS[group], **options)
