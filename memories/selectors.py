"""Reads. Queries live here so views, tasks and the pipeline share one way of asking."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL
from pgvector.django import CosineDistance

from memories.errors import NotFound
from memories.models import (
    EndUser,
    Memory,
    MemoryHistory,
    MemoryRequest,
    Session,
    Tenant,
    vector_text,
)


def end_user_get(*, tenant: Tenant, user_id: UUID | str) -> EndUser:
    """The tenant's user, or NotFound: another tenant's user is indistinguishable from none."""
    try:
        # A user being erased is not found: no reads, jobs or sessions for them any more.
        return EndUser.objects.get(tenant=tenant, pk=user_id, erasing_since__isnull=True)
    except (EndUser.DoesNotExist, ValueError, TypeError) as exc:
        raise NotFound("User not found.", field="user_id") from exc


def memory_request_get(*, tenant: Tenant, request_id: UUID | str) -> MemoryRequest:
    try:
        return MemoryRequest.objects.get(tenant=tenant, pk=request_id)
    except (MemoryRequest.DoesNotExist, ValueError) as exc:
        raise NotFound("Request not found.") from exc


def memory_get(*, tenant: Tenant, memory_id: UUID | str) -> Memory:
    try:
        return Memory.objects.get(tenant=tenant, pk=memory_id, deleted_at__isnull=True)
    except (Memory.DoesNotExist, ValueError) as exc:
        raise NotFound("Memory not found.") from exc


def memory_history(
    *, tenant: Tenant, memory_id: UUID | str, after: int | None = None, limit: int = 100
) -> list[MemoryHistory]:
    """A page of the memory's history, oldest first, after the row `after` (a cursor)."""
    # History outlives a delete: the tombstoned memory's story (content-free) is still readable.
    if not Memory.objects.filter(tenant=tenant, pk=memory_id).exists():
        raise NotFound("Memory not found.")
    rows = MemoryHistory.objects.filter(memory_id=memory_id)
    if after is not None:
        rows = rows.filter(id__gt=after)
    return list(rows.order_by("id")[:limit])


def _apply_filters(queryset: QuerySet[Memory], filters: dict[str, Any]) -> QuerySet[Memory]:
    for field in ("agent_id", "session_id", "type"):
        if filters.get(field):
            queryset = queryset.filter(**{field: filters[field]})
    if filters.get("metadata"):
        # JSONB containment, served by the GIN index on metadata.
        queryset = queryset.filter(metadata__contains=filters["metadata"])
    return queryset


def memory_list(
    *, user: EndUser, filters: dict[str, Any], cursor: tuple[str, str] | None, limit: int
) -> list[Memory]:
    """A page of the user's live memories, newest first, keyset-paginated on (created_at, id)."""
    queryset = _apply_filters(
        Memory.objects.filter(user=user, deleted_at__isnull=True), filters
    ).order_by("-created_at", "-id")
    if cursor is not None:
        created_at, memory_id = cursor
        queryset = queryset.filter(
            Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=memory_id)
        )
    return list(queryset.defer("embedding", "search_vector")[:limit])


def memory_search(
    *,
    user: EndUser,
    query_vector: list[float],
    limit: int,
    filters: dict[str, Any],
    threshold: float | None,
) -> list[Memory]:
    """The user's true top-k by cosine similarity, computed by pgvector.

    An exact scan of the user's rows (B-tree on user, then distance): no approximate index can
    drop a match here, whatever the plan. Each result carries `score` = 1 - cosine distance.
    """
    queryset = _apply_filters(Memory.objects.filter(user=user, deleted_at__isnull=True), filters)
    queryset = queryset.annotate(distance=CosineDistance("embedding", query_vector))
    if threshold is not None:
        queryset = queryset.filter(distance__lte=1 - threshold)
    results: list[Memory] = []
    for memory in queryset.order_by("distance", "id").defer("embedding", "search_vector")[:limit]:
        memory.score = 1 - memory.distance
        results.append(memory)
    return results


# The query's lexemes ORed: AND (plainto_tsquery, websearch_to_tsquery) needs every word of a
# natural question in one memory, and so matches almost nothing. Lexemes are quoted, so none is
# read as tsquery syntax; stop words are already gone (english configuration).
_OR_QUERY_SQL = """
    SELECT string_agg(quote_literal(lexeme), ' | ') FROM unnest(to_tsvector('english', %s))
"""


def memory_keyword_search(
    *, user: EndUser, query: str, limit: int, filters: dict[str, Any]
) -> list[Memory]:
    """The user's top-k memories sharing words (stemmed) with the query, by ts_rank_cd (cover
    density, normalised by the memory's length so long memories do not win by size); a query
    of stop words alone finds nothing. Each result carries `keyword_rank` (its ts_rank_cd)."""
    with connection.cursor() as cursor:
        cursor.execute(_OR_QUERY_SQL, [query])
        row = cursor.fetchone()
    lexemes = row[0] if row else None
    if not lexemes:
        return []
    search_query = SearchQuery(lexemes, search_type="raw", config="simple")
    queryset = _apply_filters(Memory.objects.filter(user=user, deleted_at__isnull=True), filters)
    ranked = (
        queryset.filter(search_vector=search_query)
        .annotate(keyword_rank=SearchRank("search_vector", search_query, cover_density=True,
                                          normalization=1))
        .order_by("-keyword_rank", "id")
        .defer("embedding", "search_vector")[:limit]
    )  # fmt: skip
    return list(ranked)


def memory_similarities(
    *, user: EndUser, memory_ids: list[Any], query_vector: list[float]
) -> dict[str, float]:
    """Cosine similarity to the query of each of these memories of the user, by id."""
    if not memory_ids:
        return {}
    rows = (
        Memory.objects.filter(user=user, pk__in=memory_ids)
        .annotate(distance=CosineDistance("embedding", query_vector))
        .values_list("pk", "distance")
    )
    return {str(pk): 1 - distance for pk, distance in rows if distance is not None}


def memory_nearest_for_many(
    *, user_id: UUID | str, vectors: list[list[float]], per_vector: int
) -> list[tuple[str, str]]:
    """The nearest live memories of the user for every vector at once, in ONE query.

    Returns (memory_id, content) pairs, de-duplicated, closest first for the first vector, then the
    next, so the LLM sees each memory once.
    """
    if not vectors:
        return []
    literals = [vector_text(vector) for vector in vectors]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT f.ord, m.id, m.content
            FROM unnest(%s::text[]) WITH ORDINALITY AS f(vec, ord)
            CROSS JOIN LATERAL (
                SELECT id, content, embedding <=> f.vec::vector AS distance
                FROM memories_memory
                WHERE user_id = %s AND deleted_at IS NULL
                ORDER BY distance
                LIMIT %s
            ) AS m
            ORDER BY f.ord, m.distance
            """,
            [literals, str(user_id), per_vector],
        )
        rows = cursor.fetchall()
    seen: dict[str, str] = {}
    for _, memory_id, content in rows:
        seen.setdefault(str(memory_id), content)
    return list(seen.items())


def session_get(*, tenant: Tenant, session_id: UUID | str) -> Session:
    try:
        return Session.objects.get(tenant=tenant, pk=session_id)
    except (Session.DoesNotExist, ValueError) as exc:
        raise NotFound("Session not found.") from exc


def memory_changes_since(
    *, user: EndUser, cursor: tuple[int, str] | None, limit: int
) -> list[Memory]:
    """The user's memories written since `cursor`, deletions (tombstones) included, in the order
    they were written, for pull-sync.

    Pages on (writing transaction id, memory id). Only rows whose transaction id lies below the
    oldest transaction still running are returned: every such transaction has ended, so no row
    can later appear behind the cursor — a client never misses a change that committed late. The
    price: a change shows up once the transactions that began before it have finished.
    """
    settled = RawSQL("pg_snapshot_xmin(pg_current_snapshot())::text::bigint", [])
    queryset = Memory.objects.filter(user=user, change_txid__lt=settled)
    if cursor is not None:
        txid, memory_id = cursor
        # The first condition is implied by the second, but PostgreSQL cannot start an index
        # scan from an OR: without it every page read the user's whole history before the
        # cursor (80 ms at the 7,000th change; 0.2 ms with it).
        queryset = queryset.filter(change_txid__gte=txid).filter(
            Q(change_txid__gt=txid) | Q(change_txid=txid, id__gt=memory_id)
        )
    return list(queryset.order_by("change_txid", "id").defer("embedding", "search_vector")[:limit])


def memory_request_list(
    *,
    tenant: Tenant,
    status: str | None,
    user_id: UUID | None,
    before: str | None,
    limit: int,
) -> list[MemoryRequest]:
    """The tenant's requests, newest first; `status=failure` is the dead-letter list."""
    queryset = MemoryRequest.objects.filter(tenant=tenant)
    if status:
        queryset = queryset.filter(status=status)
    if user_id:
        queryset = queryset.filter(user_id=user_id)
    if before:
        queryset = queryset.filter(created_at__lt=before)
    return list(queryset.order_by("-created_at", "-id").defer("payload")[:limit])
