"""Signals feed the one event publisher. Receivers are thin: build the event, record it.

Model signals cover memories, sessions and messages; the custom signals below cover what is not a
row change (a search, a clear, an error, a conflict, a summary).
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_save
from django.dispatch import Signal, receiver

from memories import events
from memories.models import Memory, Message, Session

# Sent with keyword arguments: tenant_id, user_id, and what each event needs in `data` (Django
# adds `signal` to what receivers get; they drop it).
search_performed = Signal()  # query, results, agent_id, session_id
memories_cleared = Signal()  # count
error_occurred = Signal()  # error, request_id
conflict_detected = Signal()  # memory, data
summary_created = Signal()  # session
# Memories written by the services without save() (a memory job's changes, a correction, a
# delete), so that the events of one write go in one statement: changes = [(memory, event_type),
# ...], and api_key_id (the key behind them, if known). Bulk writes (memories.batch) record
# theirs directly, with ids drawn in bulk.
memories_written = Signal()


@receiver(post_save, sender=Memory, dispatch_uid="memory_changed")
def memory_changed(sender: type, instance: Memory, created: bool, **kwargs: Any) -> None:
    if created:
        event_type = "memory.created"
    elif instance.deleted_at is not None:
        event_type = "memory.deleted"
    else:
        event_type = "memory.updated"
    events.record(events.memory_event(instance, event_type))


@receiver(memories_written, dispatch_uid="memories_written")
def on_memories_written(
    sender: type,
    changes: list[tuple[Memory, str]],
    api_key_id: str | None = None,
    **kwargs: Any,
) -> None:
    events.record_many(
        [
            events.memory_event(memory, event_type, api_key_id=api_key_id)
            for memory, event_type in changes
        ]
    )


@receiver(post_save, sender=Session, dispatch_uid="session_changed")
def session_changed(sender: type, instance: Session, created: bool, **kwargs: Any) -> None:
    if created:
        event_type = "session.started"
    elif instance.ended_at is not None and "ended_at" in (kwargs.get("update_fields") or ()):
        event_type = "session.ended"
    else:
        return
    events.record(_session_event(instance, event_type))


@receiver(post_save, sender=Message, dispatch_uid="message_added")
def message_added(sender: type, instance: Message, created: bool, **kwargs: Any) -> None:
    if created:
        session = instance.session
        events.record(
            _session_event(
                session,
                "message.added",
                message_id=instance.id,
                role=instance.role,
                content=instance.content,
            )
        )


@receiver(summary_created, dispatch_uid="summary_created")
def on_summary_created(sender: Any, session: Session, **kwargs: Any) -> None:
    events.record(_session_event(session, "summary.created", summary=session.summary))


@receiver(search_performed, dispatch_uid="search_performed")
def on_search_performed(sender: Any, tenant_id: Any, user_id: Any, **data: Any) -> None:
    data.pop("signal")
    agent_id, session_id = data.pop("agent_id", ""), data.pop("session_id", "")
    events.record_read(
        events.build_event(
            event_type="search.performed",
            tenant_id=tenant_id,
            user_id=user_id,
            agent_id=agent_id,
            session_id=session_id,
            data=data,
        )
    )


@receiver(memories_cleared, dispatch_uid="memories_cleared")
def on_memories_cleared(sender: Any, tenant_id: Any, user_id: Any, **data: Any) -> None:
    data.pop("signal")
    events.record(
        events.build_event(
            event_type="memory.cleared", tenant_id=tenant_id, user_id=user_id, data=data
        )
    )


@receiver(error_occurred, dispatch_uid="error_occurred")
def on_error_occurred(sender: Any, tenant_id: Any, user_id: Any, **data: Any) -> None:
    data.pop("signal")
    events.record(
        events.build_event(
            event_type="error.occurred", tenant_id=tenant_id, user_id=user_id, data=data
        )
    )


@receiver(conflict_detected, dispatch_uid="conflict_detected")
def on_conflict_detected(sender: Any, memory: Memory, **data: Any) -> None:
    data.pop("signal")
    events.record(events.memory_event(memory, "conflict.detected", **data))


def _session_event(session: Session, event_type: str, **data: Any) -> dict[str, Any]:
    return events.build_event(
        event_type=event_type,
        tenant_id=session.tenant_id,
        user_id=session.user_id,
        agent_id=session.agent_id,
        session_id=session.id,
        data=data,
    )
