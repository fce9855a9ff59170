"""Search as a service: the query embedded, the nearest memories read (memories.selectors), and a
`search.performed` event left for audit and analytics."""

from __future__ import annotations

from typing import Any

from memories import selectors, signals
from memories.models import EndUser, Memory
from memories.providers import Embedder


def memory_search(
    *,
    user: EndUser,
    query: str,
    limit: int,
    filters: dict[str, Any],
    threshold: float | None,
    embedder: Embedder,
) -> list[Memory]:
    """Search, and leave a `search.performed` event for audit and analytics."""
    results = selectors.memory_search(
        user=user,
        query_vector=embedder.embed([query])[0],
        limit=limit,
        filters=filters,
        threshold=threshold,
    )
    signals.search_performed.send(
        sender=Memory,
        tenant_id=user.tenant_id,
        user_id=user.id,
        query=query,
        results=len(results),
        agent_id=filters.get("agent_id", ""),
        session_id=filters.get("session_id", ""),
    )
    return results
