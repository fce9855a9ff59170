"""Which memories the approximate (HNSW) index holds: the rows of users with many memories.

An exact scan of a user's rows is exact whatever the plan, and fast while the user has few
(0.2 ms for 50); at 50,000 it is ~80 ms. So a user who reaches SEARCH_ANN_MIN_MEMORIES live
memories is marked big, and their rows are moved into a partial HNSW index (Memory.ann_indexed),
which no other user's write pays for. Beat runs `ann_index_refresh`: it marks new big users, then
moves big users' rows written since into the index, a chunk a statement (each row's index insert
is the costly part, so writes never wait for it), within a time budget a run; what is left is the
next run's. Until moved, a row is found by the exact half of the search (memories.nearest).

Moving a row changes no content: the change-txid trigger keeps the row's txid (migration 0020),
so pull-sync does not hand it out again, and no event is sent. A write that changes an indexed
row's vector takes it out again (the same trigger), for the next run to move back. A user stays
big once marked (a trigger keeps the mark).

pgvector's HNSW takes vectors of at most 2,000 dimensions: with a wider embedder the index does
not exist, no user is marked, and every search stays exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection

from memories.models import ANN_INDEX_NAME, EndUser, Memory

logger = logging.getLogger(__name__)

# Rows a statement moves in: each is a transaction of ~0.15 s (an HNSW insert is ~3 ms a row).
# Kept that short because pull-sync hands out no change newer than the oldest running
# transaction: a longer one would hold back every client's sync for as long as it runs.
_CHUNK_ROWS = 50


@dataclass(frozen=True)
class Refreshed:
    users_marked: int
    rows_indexed: int
    rows_left: bool  # the budget ran out after a full chunk: rows may be left for the next run


def ann_index_refresh(
    *, min_memories: int | None = None, budget_seconds: float | None = None
) -> Refreshed:
    """Mark the users with at least `min_memories` memories outside the index (not forgotten;
    closed ones count) as big, then move big users' rows into the index until none is left or
    `budget_seconds` have passed. `min_memories` 0 marks no new user. Safe to run in several
    processes at once (rows are taken with SKIP LOCKED)."""
    if min_memories is None:
        min_memories = settings.SEARCH_ANN_MIN_MEMORIES
    if budget_seconds is None:
        budget_seconds = settings.SEARCH_ANN_REFRESH_BUDGET_SECONDS
    marked = _big_users_mark(min_memories) if min_memories > 0 and _ann_index_exists() else 0
    deadline = time.monotonic() + budget_seconds
    indexed, moved = 0, _CHUNK_ROWS
    while moved == _CHUNK_ROWS and time.monotonic() < deadline:
        moved = _rows_move(_CHUNK_ROWS)
        indexed += moved
    if marked or indexed:
        logger.info("approximate index: %d users marked big, %d rows moved in", marked, indexed)
    return Refreshed(users_marked=marked, rows_indexed=indexed, rows_left=moved == _CHUNK_ROWS)


def ann_index_create() -> None:
    """Build the approximate index as the model declares it, if the embedding column allows
    (reembed, after it replaced the column and with it the index). Concurrently, so writes go on
    meanwhile, unless called inside a transaction. Until it is built, a big user's search still
    answers, from a scan of the user's rows."""
    if _embedding_dimensions() > HNSW_MAX_DIMENSIONS:
        return
    [index] = [index for index in Memory._meta.indexes if index.name == ANN_INDEX_NAME]
    concurrently = not connection.in_atomic_block
    with connection.schema_editor(atomic=False) as editor:
        sql = str(index.create_sql(Memory, editor, concurrently=concurrently))
    sql = sql.replace(f'"{ANN_INDEX_NAME}"', f'IF NOT EXISTS "{ANN_INDEX_NAME}"', 1)
    with connection.cursor() as cursor:
        cursor.execute(sql)


# pgvector's limit for an HNSW index on `vector` (the migration that declares it skips it beyond).
HNSW_MAX_DIMENSIONS = 2000


def _embedding_dimensions() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            [Memory._meta.db_table, "embedding"],
        )
        return int(cursor.fetchone()[0])


def _ann_index_exists() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [ANN_INDEX_NAME])
        return bool(cursor.fetchone()[0])


def _big_users_mark(min_memories: int) -> int:
    # Counted on memory_user_unindexed (live rows outside the index): every row of a small user.
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {EndUser._meta.db_table} SET ann_indexed = true
            WHERE NOT ann_indexed AND id IN (
                SELECT user_id FROM {Memory._meta.db_table}
                WHERE user_id IS NOT NULL AND deleted_at IS NULL AND NOT ann_indexed
                GROUP BY user_id HAVING count(*) >= %s)
            """,
            [min_memories],
        )
        return cursor.rowcount


def _rows_move(limit: int) -> int:
    """Move up to `limit` live rows of big users into the index, in one statement (its own
    transaction: a failure loses nothing, the rows wait for the next run)."""
    table = Memory._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {table} SET ann_indexed = true
            WHERE id IN (
                SELECT m.id FROM {EndUser._meta.db_table} u
                JOIN {table} m ON m.user_id = u.id AND m.deleted_at IS NULL AND NOT m.ann_indexed
                WHERE u.ann_indexed
                LIMIT %s FOR UPDATE OF m SKIP LOCKED)
            """,
            [limit],
        )
        return cursor.rowcount
