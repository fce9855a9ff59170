"""Search: the user's memories found by meaning (pgvector), by words (PostgreSQL full-text), or
both fused by reciprocal rank fusion (the default), with a `search.performed` event left for
audit and analytics.

Hybrid takes each retriever's true top-N for the user (SEARCH_CANDIDATES, filters applied in the
query) and scores a memory sum(weight / (SEARCH_RRF_K + rank)) over the retrievers that found it,
normalised so the best possible is 1. The vector leg's weight depends on the embedder: with the
offline hashing embedder it is weak (its vectors know words, not meaning), so keyword leads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from memories import selectors, signals
from memories.errors import InvalidInput
from memories.models import EndUser, Memory
from memories.providers import Embedder

MODES = ("hybrid", "vector", "keyword")


@dataclass
class Found:
    """A search result: the memory, its fused score in [0, 1], its cosine similarity (when
    known), and each retriever's rank of it (`why`)."""

    memory: Memory
    score: float
    similarity: float | None
    why: dict[str, int] = field(default_factory=dict)


def _weights() -> dict[str, float]:
    vector = settings.SEARCH_VECTOR_WEIGHT
    if vector is None:
        vector = 0.25 if settings.EMBEDDING_PROVIDER == "offline" else 0.5
    return {"vector": vector, "keyword": settings.SEARCH_KEYWORD_WEIGHT}


def memory_search(
    *,
    user: EndUser,
    query: str,
    limit: int,
    filters: dict[str, Any],
    threshold: float | None,
    embedder: Embedder,
    mode: str = "hybrid",
    min_score: float | None = None,
    as_of: datetime | None = None,
    recency_half_life_days: float | None = None,
) -> list[Found]:
    """Search the user's live memories (see the module's opening), or those true at `as_of`.
    `filters` as `memories.filters.memory_filters_parse` returns them. `threshold` is a minimum
    cosine similarity (so it needs the vector leg); `min_score` a minimum fused score.
    `recency_half_life_days` halves a memory's score for every that many days between when it
    happened (`occurred_at`) and now (or `as_of`), so of two equal matches the recent one wins."""
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}.", field="mode")
    if threshold is not None and mode == "keyword":
        message = "threshold is a minimum cosine similarity: it needs mode hybrid or vector."
        raise InvalidInput(message, field="threshold")
    candidates = max(limit, settings.SEARCH_CANDIDATES) if mode == "hybrid" else limit
    legs: dict[str, list[Memory]] = {}
    query_vector = embedder.embed([query])[0] if mode != "keyword" else None
    if query_vector is not None:
        legs["vector"] = selectors.memory_search(
            user=user, query_vector=query_vector, limit=candidates, filters=filters,
            threshold=threshold, as_of=as_of,
        )  # fmt: skip
    if mode != "vector":
        legs["keyword"] = selectors.memory_keyword_search(
            user=user, query=query, limit=candidates, filters=filters, as_of=as_of
        )
    found = _fused(legs, weights=_weights())
    if recency_half_life_days is not None:
        found = _recency_weighted(
            found, half_life_days=recency_half_life_days, now=as_of or timezone.now()
        )
    if query_vector is not None:
        _fill_similarities(found, user=user, query_vector=query_vector)
        if threshold is not None:
            found = [f for f in found if f.similarity is not None and f.similarity >= threshold]
    if min_score is not None:
        found = [f for f in found if f.score >= min_score]
    found = found[:limit]
    signals.search_performed.send(
        sender=Memory,
        tenant_id=user.tenant_id,
        user_id=user.id,
        query=query,
        results=len(found),
        agent_id=filters.get("agent_id", ""),
        session_id=filters.get("session_id", ""),
    )
    return found


def _fused(legs: dict[str, list[Memory]], *, weights: dict[str, float]) -> list[Found]:
    k = settings.SEARCH_RRF_K
    by_id: dict[str, Found] = {}
    for leg, memories in legs.items():
        for rank, memory in enumerate(memories, start=1):
            entry = by_id.setdefault(
                str(memory.id), Found(memory=memory, score=0.0, similarity=None)
            )
            entry.score += weights[leg] / (k + rank)
            entry.why[leg] = rank
            if leg == "vector":
                entry.similarity = memory.score
    best = sum(weights[leg] for leg in legs) / (k + 1)
    for entry in by_id.values():
        entry.score = round(entry.score / best, 6) if best else 0.0
    return sorted(by_id.values(), key=lambda f: (-f.score, str(f.memory.id)))


def _recency_weighted(found: list[Found], *, half_life_days: float, now: datetime) -> list[Found]:
    for entry in found:
        age_days = max((now - entry.memory.occurred_at).total_seconds(), 0.0) / 86_400
        entry.score = round(entry.score * 0.5 ** (age_days / half_life_days), 6)
    return sorted(found, key=lambda f: (-f.score, str(f.memory.id)))


def _fill_similarities(found: list[Found], *, user: EndUser, query_vector: list[float]) -> None:
    """Keyword-only finds get their cosine similarity too (one query), so `threshold` and
    `similarity` mean the same for every result."""
    missing = [f.memory.id for f in found if f.similarity is None]
    similarities = selectors.memory_similarities(
        user=user, memory_ids=missing, query_vector=query_vector
    )
    for entry in found:
        if entry.similarity is None:
            entry.similarity = similarities.get(str(entry.memory.id))
