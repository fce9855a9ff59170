"""Reads over the event stream: replay by time range (time travel), session timelines, and the
state of a session folded from its events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from memories.events.stream import parse_entry, read_range, stream_id_for_time

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

    Reads the stream in chunks by stream id (ids are time-ordered), so a window is found without
    reading what lies outside it; entries of other tenants are skipped.
    """
    start = f"({after_id}" if after_id else (stream_id_for_time(since) if since else "-")
    end = stream_id_for_time(until, end=True) if until else "+"
    found: list[dict[str, Any]] = []
    while len(found) < limit:
        chunk = read_range(start=start, end=end, count=SCAN_CHUNK)
        for entry_id, fields in chunk:
            if fields.get("tenant_id") != tenant_id:
                continue
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
