"""A user's nearest live memories to a vector, as SQL: an exact scan of a small user's rows, the
approximate (HNSW) index for a big user's (memories.ann_index decides who is big).

The statement has two halves, UNION ALL, each its own top-k:
- exact: the user's live rows NOT in the index (every row of a small user, a big user's rows
  written since the last refresh), found by the B-tree memory_user_unindexed, each distance
  computed, so nothing is missed;
- approximate: the rows in the index (ann_indexed), under a gate that lets the scan run only for
  a user marked big, and sets pgvector's iterative scan (so the user filter does not starve the
  result: the scan goes on past other users' rows until k of this user's are found, or it has
  visited SEARCH_ANN_MAX_SCAN_TUPLES), SEARCH_ANN_EF_SEARCH and that bound. `set_config(...,
  true)` keeps them to the statement's transaction (a search's is the statement alone), so no
  other client sees them, through PgBouncer either. A small user's statement never starts the
  index scan.
A row is in exactly one half (the flag is one column of the row), so the halves' union, cut to k,
is the user's top-k, the second half's part approximate. The bound matters with many big users:
a user whose rows are a small share of the index needs about k / share tuples visited.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings

from memories.models import EndUser, Memory

_LIVE = "deleted_at IS NULL AND valid_to IS NULL"


def user_nearest_sql(
    *,
    vector: str,
    vector_params: list[Any],
    user_id: Any,
    limit: int,
    columns: str = "id",
    where: str = "",
) -> tuple[str, list[Any]]:
    """SQL selecting `columns` and `distance` of the user's `limit` nearest live memories (their
    cosine distance to the `vector` expression, bound by `vector_params`), in no order: the
    caller sorts (by distance, then id, for a stable rank). `where`: more conditions on the rows
    (without parameters)."""
    table = Memory._meta.db_table
    more = f" AND ({where})" if where else ""
    gate = f"""EXISTS (
        SELECT FROM {EndUser._meta.db_table}
        WHERE id = %s AND ann_indexed
          AND set_config('hnsw.iterative_scan', 'relaxed_order', true) IS NOT NULL
          AND set_config('hnsw.ef_search', %s, true) IS NOT NULL
          AND set_config('hnsw.max_scan_tuples', %s, true) IS NOT NULL)"""
    sql = f"""
        (SELECT {columns}, embedding <=> {vector} AS distance FROM {table}
         WHERE user_id = %s AND {_LIVE} AND NOT ann_indexed{more}
         ORDER BY distance, id LIMIT %s)
        UNION ALL
        (SELECT {columns}, embedding <=> {vector} AS distance FROM {table}
         WHERE user_id::text = %s::text AND {_LIVE} AND ann_indexed{more} AND {gate}
         ORDER BY distance LIMIT %s)
    """
    # The approximate half names its user through a cast, which no B-tree holds: PostgreSQL would
    # otherwise often take memory_user_live and sort (exact, but the scan of every row this index
    # is here to avoid).
    user_text = str(uuid.UUID(str(user_id)))  # as PostgreSQL writes a uuid as text
    params = [
        *vector_params, user_id, limit,
        *vector_params, user_text, user_id, str(settings.SEARCH_ANN_EF_SEARCH),
        str(settings.SEARCH_ANN_MAX_SCAN_TUPLES), limit,
    ]  # fmt: skip
    return sql, params
