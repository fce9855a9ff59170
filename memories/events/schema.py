"""The event schema (version 1) and the channel names. Pure functions: no I/O."""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

from django.utils import timezone

from memories import merges


class MemoryFields(Protocol):
    """What an event reads of a memory: a `Memory`, or a row a bulk write is about to COPY."""

    @property
    def id(self) -> Any: ...
    @property
    def tenant_id(self) -> Any: ...
    @property
    def user_id(self) -> Any: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def metadata(self) -> Any: ...
    @property
    def version(self) -> int: ...
    @property
    def scope(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def updated_at(self) -> Any: ...
    @property
    def occurred_at(self) -> Any: ...
    @property
    def valid_to(self) -> Any: ...
    @property
    def vector_clock(self) -> Any: ...
    @property
    def written_at(self) -> Any: ...
    @property
    def merge_rule(self) -> str: ...
    @property
    def conflicted(self) -> bool: ...
    @property
    def state(self) -> Any: ...
    @property
    def created_at(self) -> Any: ...


SCHEMA_VERSION = 1

# The API key whose call is being served (set by the API for the call's length): the default of
# an event's `source.api_key_id`, so every change an API call makes names its key, whichever
# service records the event. Empty outside a call (a worker, the admin) unless given.
acting_key_id: ContextVar[str] = ContextVar("acting_key_id", default="")

EVENT_TYPES = (
    "memory.created",
    "memory.updated",
    "memory.deleted",
    "memory.closed",
    "memory.cleared",
    "message.added",
    "session.started",
    "session.ended",
    "summary.created",
    "search.performed",
    "error.occurred",
    "conflict.detected",
)


# The event of each kind of memory history entry (MemoryHistory.Event).
EVENT_TYPE_OF_CHANGE = {
    "ADD": "memory.created",
    "UPDATE": "memory.updated",
    "CLOSE": "memory.closed",
    "DELETE": "memory.deleted",
    "OVERWRITTEN": "memory.updated",  # its clock took in a concurrent write that lost
}


def user_channel(user_id: object) -> str:
    return f"user:{user_id}:memories"


def tenant_channel(tenant_id: object) -> str:
    return f"tenant:{tenant_id}:shared"


def topic_channel(topic: str) -> str:
    return f"topic:{topic}:updates"


def system_channel() -> str:
    return "system:global"


def channels_for_memory(memory: MemoryFields) -> list[str]:
    """The owner's channel (a shared memory has none); the shared channel of its scope too."""
    channels = [user_channel(memory.user_id)] if memory.user_id else []
    if memory.scope == "tenant":
        channels.append(tenant_channel(memory.tenant_id))
    elif memory.scope == "topic" and memory.topic:
        channels.append(topic_channel(memory.topic))
    return channels


def build_event(
    *,
    event_type: str,
    tenant_id: object,
    user_id: object = None,
    agent_id: str = "",
    session_id: object = "",
    memory: dict[str, Any] | None = None,
    channels: list[str] | None = None,
    data: dict[str, Any] | None = None,
    at: datetime | None = None,
    event_id: str | None = None,
    api_key_id: str | None = None,
) -> dict[str, Any]:
    """The event dict (schema 1). `event_id`: a fresh UUID4's text, when the caller (a bulk
    write) draws many at once instead of one read of the system's randomness per event.
    `api_key_id`: the key behind the change (by default the key of the API call served)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {
        "schema": SCHEMA_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "timestamp": _isoformat(at or timezone.now()),
        "memory": memory,
        "source": {
            "agent_id": agent_id or "",
            "session_id": str(session_id or ""),
            "user_id": str(user_id) if user_id else "",
            "tenant_id": str(tenant_id) if tenant_id else "",
            "api_key_id": acting_key_id.get() if api_key_id is None else api_key_id,
        },
        "channels": channels
        if channels is not None
        else ([user_channel(user_id)] if user_id else []),
        "data": data or {},
    }


def memory_event(
    memory: MemoryFields,
    event_type: str,
    *,
    event_id: str | None = None,
    api_key_id: str | None = None,
    **data: Any,
) -> dict[str, Any]:
    return build_event(
        event_type=event_type,
        tenant_id=memory.tenant_id,
        user_id=memory.user_id,
        agent_id=memory.agent_id,
        session_id=memory.session_id,
        memory=memory_document(memory, deleted=event_type == "memory.deleted"),
        channels=channels_for_memory(memory),
        data=data,
        at=memory.updated_at,
        event_id=event_id,
        api_key_id=api_key_id,
    )


def memory_document(memory: MemoryFields, *, deleted: bool = False) -> dict[str, Any]:
    """The memory as the API shows it (the same keys), so that a client's cache may keep an
    event's `memory` as the memory itself. A deleted one keeps no content."""
    document: dict[str, Any] = {
        "id": str(memory.id),
        "user_id": str(memory.user_id) if memory.user_id else None,
        "content": None if deleted else memory.content,
        "type": memory.type,
        "scope": memory.scope,
        "topic": memory.topic,
        "metadata": memory.metadata,
        "agent_id": memory.agent_id,
        "session_id": memory.session_id,
        "version": memory.version,
        "clock": memory.vector_clock or {},
        "merge": memory.merge_rule,
        "conflicted": memory.conflicted,
        "written_at": _isoformat(memory.written_at),
        "created_at": _isoformat(memory.created_at),
        "updated_at": _isoformat(memory.updated_at),
        "occurred_at": _isoformat(memory.occurred_at),
        "valid_to": _isoformat(memory.valid_to),
    }
    return document | typed_value(memory.type, memory.state)


def typed_value(memory_type: str, state: Any) -> dict[str, Any]:
    """What a list or a counter holds, read from its merge state: `items` or `value`."""
    if memory_type == "list":
        return {"items": merges.orset_items(state or merges.orset_empty())}
    if memory_type == "counter":
        return {"value": merges.counter_value(state or merges.counter_empty())}
    return {}


def _isoformat(value: datetime | None) -> str | None:
    # Keyed by the zone too: the same instant in two zones compares equal, and prints apart.
    return _iso(value, value.tzinfo) if value is not None else None


@lru_cache(maxsize=64)
def _iso(value: datetime, zone: object) -> str:
    # A bulk write's thousand events share their few times (five each), and datetime.isoformat
    # was a tenth of the web process's CPU in such a write.
    return value.isoformat()
