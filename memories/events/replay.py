"""Reads over the event stream: replay by time range (time travel), session timelines, and the
state of a session folded from its events. A session older than what the stream retains is told
from its rows in PostgreSQL instead (its messages, summary and the history of its memories)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from memories.errors import Gone
from memories.events.schema import EVENT_TYPE_OF_CHANGE, build_event
from memories.events.stream import (
    parse_entry,
    read_range,
    redis_client,
    replayable_from,
    stream_id_for_time,
    stream_id_order,
    tenant_stream_key,
)
from memories.models import MemoryHistory, Session

# Events a session's timeline holds at most.
SESSION_EVENTS_MAX = 5000

SCAN_CHUNK = 1000


def events_in_range(
    *,
    tenant_id: str,
    since: datetime | None = None,
    until: datetime | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    event_types: list[str] | None = None,
    limit: int = 500,
    after_id: str | None = None,
) -> list[dict[str, Any]]:
    """The tenant's events in [since, until], oldest first, filtered, at most `limit`.

    Reads the tenant's own stream in chunks by stream id (ids are time-ordered), so a window is
    found without reading what lies outside it, nor any other tenant's entry. An `after_id`
    from which the stream can no longer replay without a gap raises Gone (410).
    """
    if after_id and stream_id_order(after_id) < replayable_from(tenant_id):
        raise Gone(
            "Events after this position were trimmed (or predate per-tenant replay); fetch the "
            "current state with GET /v1/sync, then read on from the newest events.",
            field="after",
        )
    start = f"({after_id}" if after_id else (stream_id_for_time(since) if since else "-")
    end = stream_id_for_time(until, end=True) if until else "+"
    key = tenant_stream_key(tenant_id)
    found: list[dict[str, Any]] = []
    while len(found) < limit:
        chunk = read_range(start=start, end=end, count=SCAN_CHUNK, key=key)
        for entry_id, fields in chunk:
            if user_id and fields.get("user_id") != user_id:
                continue
            if session_id and fields.get("session_id") != session_id:
                continue
            if event_types and fields.get("type") not in event_types:
                continue
            found.append(parse_entry(entry_id, fields))
            if len(found) == limit:
                break
        if len(chunk) < SCAN_CHUNK:
            break
        start = f"({chunk[-1][0]}"
    return found


def session_events(*, tenant_id: str, session: Session) -> list[dict[str, Any]]:
    """The session's events, oldest first: from the stream while it still holds the session's
    start, else rebuilt from the database (then without stream ids, and without the events that
    leave no row: searches, errors)."""
    started = stream_id_order(stream_id_for_time(session.started_at))
    if replayable_from(tenant_id, client=redis_client()) <= started:
        return events_in_range(
            tenant_id=tenant_id,
            session_id=str(session.id),
            since=session.started_at,
            limit=SESSION_EVENTS_MAX,
        )
    return session_events_from_rows(session=session)


def session_events_from_rows(*, session: Session) -> list[dict[str, Any]]:
    """The session told by its rows, in the events' shape, oldest first."""
    common: dict[str, Any] = {
        "tenant_id": session.tenant_id,
        "user_id": session.user_id,
        "agent_id": session.agent_id,
        "session_id": session.id,
    }
    rebuilt = [build_event(event_type="session.started", at=session.started_at, **common)]
    for message in session.messages.all()[:SESSION_EVENTS_MAX]:
        data = {"message_id": message.id, "role": message.role, "content": message.content}
        rebuilt.append(
            build_event(event_type="message.added", at=message.created_at, data=data, **common)
        )
    history = (
        MemoryHistory.objects.filter(
            memory__tenant_id=session.tenant_id, memory__session_id=str(session.id)
        )
        .select_related("memory")
        .order_by("id")[:SESSION_EVENTS_MAX]
    )
    for change in history:
        memory = {"id": str(change.memory_id), "content": change.new_content}
        rebuilt.append(
            build_event(
                event_type=EVENT_TYPE_OF_CHANGE[change.event],
                at=change.created_at,
                memory=memory,
                **common,
            )
        )
    if session.ended_at is not None:
        if session.summary:
            rebuilt.append(
                build_event(
                    event_type="summary.created",
                    at=session.ended_at,
                    data={"summary": session.summary},
                    **common,
                )
            )
        rebuilt.append(build_event(event_type="session.ended", at=session.ended_at, **common))
    rebuilt.sort(key=lambda event: event["timestamp"])
    return [{"id": None, **event} for event in rebuilt[:SESSION_EVENTS_MAX]]


def session_reconstruct(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold a session's events into its state: a pure function of the events, in order."""
    state: dict[str, Any] = {
        "started_at": None,
        "ended_at": None,
        "agent_id": "",
        "messages": [],
        "summary": None,
        "searches": 0,
        "memory_changes": [],
        "errors": 0,
        "events": len(events),
    }
    for event in events:
        kind, data = event["event_type"], event.get("data") or {}
        if kind == "session.started":
            state["started_at"] = event["timestamp"]
            state["agent_id"] = event["source"]["agent_id"]
        elif kind == "session.ended":
            state["ended_at"] = event["timestamp"]
        elif kind == "message.added":
            state["messages"].append(
                {"role": data.get("role"), "content": data.get("content"), "at": event["timestamp"]}
            )
        elif kind == "summary.created":
            state["summary"] = data.get("summary")
        elif kind == "search.performed":
            state["searches"] += 1
        elif kind.startswith("memory."):
            memory = event.get("memory") or {}
            state["memory_changes"].append(
                {"event": kind, "memory_id": memory.get("id"), "content": memory.get("content")}
            )
        elif kind == "error.occurred":
            state["errors"] += 1
    return state


def events_latest(
    *, tenant_id: str, user_id: str | None = None, limit: int = 30
) -> list[dict[str, Any]]:
    """The tenant's newest `limit` events (of one user, when named), oldest first, each with its
    stream id as `id`; a user's are looked for among the tenant's newest SCAN_CHUNK only."""
    reply = redis_client().xrevrange(
        tenant_stream_key(tenant_id), count=SCAN_CHUNK if user_id else limit
    )
    entries = cast(list[tuple[str, dict[str, str]]], reply)
    if user_id:
        entries = [entry for entry in entries if entry[1].get("user_id") == user_id][:limit]
    return [parse_entry(entry_id, fields) for entry_id, fields in reversed(entries)]
