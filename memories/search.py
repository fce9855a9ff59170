"""Search: the user's memories found by meaning (pgvector), by words (PostgreSQL full-text), or
both fused by reciprocal rank fusion (the default), with a `search.performed` event left for
audit and analytics.

Each retriever (a leg) takes its true top-N for the user (SEARCH_CANDIDATES, filters applied in
its query; for a user with very many memories, a plain search's vector leg is approximate, through
the HNSW index: memories.nearest); a memory scores sum(weight / (SEARCH_RRF_K + rank)) over the
legs that found it, normalised so the best possible is 1. The vector leg's weight depends on the
embedder: with the offline hashing embedder it is weak (its vectors know words, not meaning), so
keyword leads.

The legs, the fusion, the similarities, the recency weighting, the thresholds and the limit are
ONE statement (`_ranked`), the keyword leg's weighing of the query's words included: a search
costs one round trip and builds only the memories it returns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.postgres.search import SearchQueryField, SearchRank, SearchVector
from django.db import connection
from django.db.models import BooleanField, F, FloatField, Func, QuerySet, Value
from django.db.models.expressions import RawSQL
from django.utils import timezone
from pgvector.django import CosineDistance

from memories import selectors, signals
from memories.errors import InvalidInput, NotFound
from memories.models import DateWords, EndUser, Memory, vector_text
from memories.nearest import user_nearest_sql
from memories.providers import Embedder

MODES = ("hybrid", "vector", "keyword")
# A retriever's query: its top-N as rows of (id, rank_key), best first; or that query compiled
# (SQL and parameters).
Leg = QuerySet[Any, Any]
CompiledLeg = tuple[str, tuple[Any, ...]]


@dataclass
class Found:
    """A search result: the memory (a row: `RESULT_COLUMNS` by name, JSON decoded; no model
    instance, which would cost more than the search's SQL for 20 results), its fused score in
    [0, 1], its cosine similarity (when known), and each retriever's rank of it (`why`)."""

    memory: dict[str, Any]
    score: float
    similarity: float | None
    why: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UnreadUser:
    """A user named by id, not read yet: the search reads it inside its own statement (a read
    of the user first would cost a round trip and a model instance per search), answers
    NotFound if it is not the tenant's or is being erased, and calls `check` with the user's
    creator key (memories.access's `user(..., created_by_key_id=)`) before anything is shown
    or recorded."""

    tenant_id: Any
    id: Any
    check: Callable[[Any], None] | None = None


def _weights() -> dict[str, float]:
    vector = settings.SEARCH_VECTOR_WEIGHT
    if vector is None:
        vector = 0.25 if settings.EMBEDDING_PROVIDER == "offline" else 0.5
    return {"vector": vector, "keyword": settings.SEARCH_KEYWORD_WEIGHT}


def memory_search(
    *,
    user: EndUser | UnreadUser,
    query: str,
    limit: int,
    filters: dict[str, Any],
    threshold: float | None,
    embedder: Embedder,
    mode: str = "hybrid",
    min_score: float | None = None,
    as_of: datetime | None = None,
    recency_half_life_days: float | None = None,
    include_shared: bool = False,
    topics: tuple[str, ...] = (),
) -> list[Found]:
    """Search the user's live memories (see the module's opening), or those true at `as_of`.
    `filters` as `memories.filters.memory_filters_parse` returns them. `threshold` is a minimum
    cosine similarity (so it needs the vector leg); `min_score` a minimum fused score.
    `recency_half_life_days` halves a memory's score for every that many days between when it
    happened (`occurred_at`) and now (or `as_of`), so of two equal matches the recent one wins.
    `user`: one read already, or an `UnreadUser` the search reads and checks itself."""
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}.", field="mode")
    if threshold is not None and mode == "keyword":
        message = "threshold is a minimum cosine similarity: it needs mode hybrid or vector."
        raise InvalidInput(message, field="threshold")
    candidates = max(limit, settings.SEARCH_CANDIDATES) if mode == "hybrid" else limit
    query_vector = embedder.embed([query])[0] if mode != "keyword" else None
    names = [name for name in _LEG_ORDER if mode in ("hybrid", name)]
    legs: dict[str, Leg | CompiledLeg]
    if not filters and as_of is None and not include_shared and not topics and threshold is None:
        legs = {name: _plain_leg(name, candidates, user.id, query_vector) for name in names}
    else:
        base = selectors.memories_of(
            user, filters=filters, as_of=as_of, include_shared=include_shared, topics=topics
        )
        legs = {}
        if query_vector is not None:
            legs["vector"] = _vector_leg(base, query_vector, threshold=threshold, limit=candidates)
        if mode != "vector":
            legs["keyword"] = _keyword_leg(base, as_of=as_of, limit=candidates)
    unread = user if isinstance(user, UnreadUser) else None
    found, creator = _ranked(
        legs,
        query_vector=query_vector,
        query_words=(user.id, query) if "keyword" in legs else None,
        limit=limit,
        threshold=threshold,
        min_score=min_score,
        recency=(as_of or timezone.now(), recency_half_life_days)
        if recency_half_life_days is not None
        else None,
        user=unread,
    )
    if unread is not None and unread.check is not None:
        unread.check(creator)
    if as_of is not None:
        _show_contents_then(found, as_of=as_of)
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


# --- The legs -------------------------------------------------------------------------------------


def _vector_leg(
    base: QuerySet[Memory], query_vector: list[float], *, threshold: float | None, limit: int
) -> Leg:
    """The true top-k by cosine distance of a filtered search: an exact scan of the rows (B-tree
    on the user, then distance), so no approximate index can drop a match, whatever the plan (a
    filter could starve the index's scan; a plain search's leg is `_plain_leg`'s). With
    `as_of`, ranked by the current vectors (history keeps no vector of an old content)."""
    # The vector as the similarity shown has it (memories.models.vector_text, not pgvector's slower
    # formatter): the same float4s, from the same text.
    leg = base.annotate(rank_key=CosineDistance("embedding", Value(vector_text(query_vector))))
    if threshold is not None:
        leg = leg.filter(rank_key__lte=1 - threshold)
    return leg.order_by("rank_key", "id").values("id", "rank_key")[:limit]


# The query's words, a CTE of the search's statement (`_ranked`, which fills in the user and the
# query): each distinct lexeme (stop words are already gone: english configuration) as a tsquery,
# with its weight, BM25's inverse document frequency over the user's live memories, so a word most
# of them share counts for little and a rare one for much. The weight is numeric (exact sums), of
# the float8's shortest text: the very value the weights had when they were computed apart and
# sent as literals, so the ranking is unchanged. The DISTINCT's order is kept for the ORed query.
_QUERY_WORDS_SQL = f"""
    query_words AS MATERIALIZED (
        SELECT to_tsquery('simple', quote_literal(t.lexeme)) AS q,
               quote_literal(t.lexeme) AS quoted,
               ln(1 + (total.n - df.n + 0.5::float8) / (df.n + 0.5::float8))::text::numeric
                   AS weight
        FROM (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %s))) AS t,
             LATERAL (SELECT count(*) AS n FROM {Memory._meta.db_table} m
                      WHERE m.user_id = %s AND m.deleted_at IS NULL AND m.valid_to IS NULL
                        AND m.search_vector @@ quote_literal(t.lexeme)::tsquery) AS df,
             (SELECT count(*) AS n FROM {Memory._meta.db_table} m
              WHERE m.user_id = %s AND m.deleted_at IS NULL AND m.valid_to IS NULL) AS total
    ),
    query_any AS (
        SELECT to_tsquery('simple', string_agg(quoted, ' | ')) AS q FROM query_words
    )
"""


class _WordsHeld(Func):
    """The summed weights of the query's words (the statement's `query_words`) a document holds."""

    template = (
        "(SELECT coalesce(sum(w.weight), 0.0) FROM query_words w WHERE %(expressions)s @@ w.q)"
    )
    output_field = FloatField()


class _Holds(Func):
    """`document @@ query` for a query given as an expression (Django's `@@` lookup would take
    it for text and parse it again)."""

    function = ""
    arg_joiner = " @@ "
    output_field = BooleanField()


# Any of the query's words: their tsqueries ORed (NULL when the query has none, which matches
# nothing).
_ANY_WORD = RawSQL("(SELECT q FROM query_any)", (), output_field=SearchQueryField())


def _keyword_leg(base: QuerySet[Memory], *, as_of: datetime | None, limit: int) -> Leg:
    """The user's top-k memories sharing words (stemmed) with the query (the statement's
    `query_words`, see `_QUERY_WORDS_SQL`).

    The query's lexemes are ORed (AND, as plainto_tsquery and websearch_to_tsquery do, needs
    every word of a natural question in one memory, and so matches almost nothing); a memory
    scores the weights of those it holds, ties broken by ts_rank_cd (cover density, normalised
    by the memory's length so long memories do not win by size). With `as_of`, matched on the
    content the memories had then."""
    # The stored vector, or (as_of) one made from the content then: an expression, never a name,
    # which SearchRank would take for text and parse again.
    document: Any = F("search_vector")
    if as_of is not None:
        document = SearchVector("content_then", config="english") + SearchVector(
            DateWords("occurred_at"), config="english"
        )
    density = SearchRank(document, _ANY_WORD, cover_density=True, normalization=1)
    return (
        base.filter(_Holds(document, _ANY_WORD))
        .annotate(rank_key=_WordsHeld(document) + density)
        .order_by("-rank_key", "id")
        .values("id", "rank_key")[:limit]
    )


# A plain search's legs (no filters, `as_of`, shared memories, topics or threshold: most
# searches). The keyword leg is compiled once per process and kept: Django's building and
# compiling of a leg cost about as much as PostgreSQL's running it. Compiled with a stand-in for
# the user's id (a nil UUID, which no user has), which each search puts back. The vector leg is
# written as SQL (memories.nearest): a big user's goes through the approximate index.
_STAND_IN_USER = uuid.UUID(int=0)
_plain_legs: dict[tuple[str, int], CompiledLeg] = {}


def _plain_leg(
    name: str, limit: int, user_id: Any, query_vector: list[float] | None
) -> CompiledLeg:
    if name == "vector":
        # Exact for a small user, through the approximate index for a big one (memories.nearest).
        assert query_vector is not None
        nearest, nearest_params = user_nearest_sql(
            vector="%s::vector", vector_params=[vector_text(query_vector)], user_id=user_id,
            limit=limit,
        )  # fmt: skip
        sql = f"SELECT id, distance AS rank_key FROM ({nearest}) AS nearest"
        return f"{sql} ORDER BY rank_key, id LIMIT %s", (*nearest_params, limit)
    compiled = _plain_legs.get((name, limit))
    if compiled is None:
        base = selectors.memories_of(UnreadUser(tenant_id=None, id=_STAND_IN_USER), filters={})
        leg = _keyword_leg(base, as_of=None, limit=limit)
        compiled = _plain_legs[(name, limit)] = leg.query.sql_with_params()
    keyword_sql, params = compiled
    return keyword_sql, tuple(
        user_id if isinstance(param, uuid.UUID) and param == _STAND_IN_USER else param
        for param in params
    )


# --- Fusion ---------------------------------------------------------------------------------------

_LEG_ORDER = {"vector": "rank_key, id", "keyword": "rank_key DESC, id"}
# What a result shows (memories.api's MemoryOutput; `state` for a list's items or a counter's
# value), as attnames; the JSON ones arrive as text (Django loads jsonb as text) and are decoded.
RESULT_COLUMNS = (
    "id", "user_id", "content", "type", "scope", "topic", "metadata", "agent_id", "session_id",
    "version", "vector_clock", "merge_rule", "conflicted", "written_at", "created_at",
    "updated_at", "occurred_at", "valid_to", "state",
)  # fmt: skip
_JSON_COLUMNS = frozenset(("metadata", "vector_clock", "state"))


def _ranked(
    legs: Mapping[str, Leg | CompiledLeg],
    *,
    query_vector: list[float] | None,
    limit: int,
    threshold: float | None,
    min_score: float | None,
    recency: tuple[datetime, float] | None,
    query_words: tuple[Any, str] | None = None,
    user: UnreadUser | None = None,
) -> tuple[list[Found], Any]:
    """The legs fused, ranked and cut in one statement, and the result rows as `Found`; with an
    unread `user`, that user read in the same statement (NotFound if the tenant has no such
    user) and its creator key returned with the results (None otherwise). `query_words`, for
    the keyword leg: (the user whose live memories weigh the words, the query)."""
    weights, k = _weights(), settings.SEARCH_RRF_K
    params: list[Any] = []
    ctes, parts = [], []
    if query_words is not None:
        words_of, query = query_words
        ctes.append(_QUERY_WORDS_SQL)
        params += [query, words_of, words_of]
    for name, leg in legs.items():
        leg_sql, leg_params = leg if isinstance(leg, tuple) else leg.query.sql_with_params()
        params += leg_params
        ctes.append(
            f"{name}_leg AS (SELECT id, row_number() OVER (ORDER BY {_LEG_ORDER[name]}) AS rank"
            f" FROM ({leg_sql}) AS leg)"
        )
        ranks = ["rank" if other == name else "NULL::bigint" for other in _LEG_ORDER]
        parts.append(f"SELECT id, {', '.join(ranks)}, %s / (%s + rank) FROM {name}_leg")
    params += [value for name in legs for value in (weights[name], k)]
    # The best possible raw score, to normalise by: every leg's first place; the keyword leg
    # counts only if the query has words (a query of stop words only runs no keyword leg).
    best = sum(weights[name] for name in legs) / (k + 1)
    without_words = sum(weights[name] for name in legs if name != "keyword") / (k + 1) or best
    similarity = "NULL::float8"
    if query_vector is not None:
        similarity = "1 - (m.embedding <=> %s::vector)"
        params.append(vector_text(query_vector))
    score = "f.raw / %s"
    params.append(best)
    if query_words is not None and without_words != best:
        score = "f.raw / (CASE WHEN EXISTS (SELECT FROM query_words) THEN %s ELSE %s END)"
        params.append(without_words)
    if recency is not None:
        score += " * power(0.5, greatest(extract(epoch FROM %s - m.occurred_at), 0) / %s)"
        params += [recency[0], recency[1] * 86_400]
    conditions = []
    if threshold is not None:
        conditions.append("similarity >= %s")
        params.append(threshold)
    if min_score is not None:
        conditions.append("score >= %s")
        params.append(min_score)
    params.append(limit)
    columns = ", ".join(f"m.{connection.ops.quote_name(name)}" for name in RESULT_COLUMNS)
    table = Memory._meta.db_table
    top = f"""
        SELECT * FROM (
            SELECT {columns}, f.vector_rank, f.keyword_rank, {similarity} AS similarity,
                   {score} AS score
            FROM fused f JOIN {table} m ON m.id = f.id
        ) AS ranked
        {"WHERE " + " AND ".join(conditions) if conditions else ""}
        ORDER BY score DESC, id
        LIMIT %s
    """
    if user is None:
        final = "SELECT top.*, NULL FROM top ORDER BY score DESC, id"
    else:
        # One row per result and the user's creator on each; the user alone (NULLs) when
        # nothing matched; no row when the tenant has no such user.
        final = f"""
            SELECT top.*, u.created_by_key_id FROM ({_USER_SQL}) u LEFT JOIN top ON true
            ORDER BY top.score DESC, top.id
        """
        params += [user.id, user.tenant_id]
    sql = f"""
        WITH {", ".join(ctes)},
        fused AS (
            SELECT id, max(vector_rank) AS vector_rank, max(keyword_rank) AS keyword_rank,
                   sum(part) AS raw
            FROM ({" UNION ALL ".join(parts)}) AS parts (id, vector_rank, keyword_rank, part)
            GROUP BY id
        ),
        top AS ({top})
        {final}
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found_rows = cursor.fetchall()
    if user is not None and not found_rows:
        raise NotFound("User not found.", field="user_id")
    creator = found_rows[0][-1] if found_rows else None
    if found_rows and found_rows[0][0] is None:  # the user's row alone: no results
        found_rows = []
    width = len(RESULT_COLUMNS)
    found = []
    for row in found_rows:
        memory = dict(zip(RESULT_COLUMNS, row[:width], strict=True))
        for name in _JSON_COLUMNS:
            text = memory[name]
            memory[name] = json.loads(text) if isinstance(text, str) else text
        vector_rank, keyword_rank, row_similarity, row_score, _ = row[width:]
        why = {"vector": vector_rank, "keyword": keyword_rank}
        found.append(
            Found(
                memory=memory,
                score=round(row_score, 6),
                similarity=row_similarity,
                why={leg: rank for leg, rank in why.items() if rank is not None},
            )
        )
    return found, creator


# The user a search names, as selectors.end_user_get finds it (id, tenant), not being erased.
_USER_SQL = f"""
    SELECT created_by_key_id FROM {EndUser._meta.db_table}
    WHERE id = %s AND tenant_id = %s AND erasing_since IS NULL
"""


def _show_contents_then(found: list[Found], *, as_of: datetime) -> None:
    """Results of a search `as_of` show the content each memory had then."""
    ids = [f.memory["id"] for f in found]
    then = dict(
        Memory.objects.filter(pk__in=ids)
        .annotate(then=selectors.content_then(as_of))
        .values_list("pk", "then")
    )
    for entry in found:
        entry.memory["content"] = then[entry.memory["id"]]
