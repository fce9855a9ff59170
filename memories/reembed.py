"""Re-embedding every memory after the embedder or its dimension changes (`manage.py reembed`),
and what the stored vectors are: their dimension (the column's type) and the embedder that wrote
them (the column's comment, "provider:model:dimensions").

The new vectors go into a shadow column, `embedding_next vector(N)`, while search keeps reading
the old `embedding`; when every live memory has one, one transaction swaps the columns. All the
state is in the database, so a run killed at any point resumes where it stopped:
- the shadow column exists while a reembed is under way; its comment names the target embedder
  (a run for another one starts over);
- a memory is done when its `embedding_next` is set. While the shadow column exists, a trigger
  empties it whenever a write changes the memory's content or embedding (a process still on the
  old embedder), and a memory created meanwhile starts empty: they are simply not done yet. A
  batch writes a vector only if the content is still the one it embedded.
- the swap locks the table (searches wait for it, a few milliseconds), embeds what the writes of
  the last moments left undone, drops the old column and renames the new one; then, with the
  lock released, the approximate index is built again on it (memories.ann_index; meanwhile a big
  user's search is answered by a scan of the user's rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections, transaction
from psycopg.errors import DeadlockDetected, LockNotAvailable

from memories.ann_index import ann_index_create
from memories.models import Memory, vector_text
from memories.providers import Embedder
from memories.providers.local import MODEL_NAME as LOCAL_MODEL_NAME

TABLE = Memory._meta.db_table
# The offline embedder's names in the stored label: its vectors changed with its features.
FIRST_HASHING_MODEL_NAME = "hashing"
OFFLINE_MODEL_NAME = "hashing2"
SHADOW = "embedding_next"
_FIRST_ID = "00000000-0000-0000-0000-000000000000"
# Passes over the rows left undone (written meanwhile) before the swap embeds the rest under its
# lock: more passes while many remain, so the lock is held for a few rows only.
_MAX_PASSES = 5
_SWAP_ATTEMPTS = 5

_STALE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {TABLE}_reembed_stale() RETURNS trigger AS $$
BEGIN
    NEW.{SHADOW} := NULL;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""
_STALE_TRIGGER = f"""
CREATE TRIGGER {TABLE}_reembed_stale BEFORE UPDATE OF content, embedding ON {TABLE}
    FOR EACH ROW
    WHEN (OLD.content IS DISTINCT FROM NEW.content OR OLD.embedding IS DISTINCT FROM NEW.embedding)
    EXECUTE FUNCTION {TABLE}_reembed_stale()
"""
# ALTER TABLE refuses to run past deferred checks still pending in the transaction (the memory's
# owner key): when called inside a caller's transaction, check them first.
_CHECK_DEFERRED = "SET CONSTRAINTS ALL IMMEDIATE"
_DROP_STALE_TRIGGER = (
    f"DROP TRIGGER IF EXISTS {TABLE}_reembed_stale ON {TABLE}",
    f"DROP FUNCTION IF EXISTS {TABLE}_reembed_stale()",
)


class ReembedError(Exception):
    """The re-embedding cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class EmbedderSpec:
    """Which embedder wrote (or is to write) a column of vectors."""

    provider: str
    model: str
    dimensions: int

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.model}:{self.dimensions}"


def configured_embedder() -> EmbedderSpec:
    """The embedder this process is configured with (settings)."""
    provider = settings.EMBEDDING_PROVIDER
    model = {"offline": OFFLINE_MODEL_NAME, "local": LOCAL_MODEL_NAME}.get(
        provider, settings.EMBEDDING_MODEL
    )
    return EmbedderSpec(provider=provider, model=model, dimensions=settings.EMBEDDING_DIMENSIONS)


@dataclass(frozen=True)
class StoredEmbeddings:
    dimensions: int  # the column's type, vector(N)
    embedder: str  # the column's comment: the label of the embedder that wrote it ("": unknown)
    next_dimensions: int | None = None  # a reembed under way: its shadow column's
    next_embedder: str = ""


def stored_embeddings(*, using: str = DEFAULT_DB_ALIAS) -> StoredEmbeddings | None:
    """What the memories' vectors are; None before the table is migrated."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            """
            SELECT a.attname, a.atttypmod, coalesce(col_description(a.attrelid, a.attnum), '')
            FROM pg_attribute a
            WHERE a.attrelid = to_regclass(%s) AND a.attname IN ('embedding', %s)
              AND NOT a.attisdropped
            """,
            [TABLE, SHADOW],
        )
        columns = {name: (typmod, comment) for name, typmod, comment in cursor.fetchall()}
    if "embedding" not in columns:
        return None
    dimensions, embedder = columns["embedding"]
    next_dimensions, next_embedder = columns.get(SHADOW, (None, ""))
    return StoredEmbeddings(dimensions, embedder, next_dimensions, next_embedder)


def is_current(stored: StoredEmbeddings, spec: EmbedderSpec) -> bool:
    """True when the stored vectors are `spec`'s and no re-embedding is under way."""
    return (
        stored.embedder == spec.label
        and stored.dimensions == spec.dimensions
        and stored.next_dimensions is None
    )


def embeddings_record(*, spec: EmbedderSpec, using: str = DEFAULT_DB_ALIAS) -> bool:
    """Name `spec` as the stored vectors' embedder when none is named yet and the dimension
    agrees (after `migrate`: a new database's vectors will be this embedder's, and an existing
    one's most likely are). True if it did."""
    stored = stored_embeddings(using=using)
    if stored is None or stored.embedder or stored.dimensions != spec.dimensions:
        return False
    with connections[using].cursor() as cursor:
        cursor.execute(f"COMMENT ON COLUMN {TABLE}.embedding IS %s", [spec.label])
    return True


@dataclass(frozen=True)
class Progress:
    done: int  # live memories with their new vector
    total: int  # live memories
    embedded: int  # texts embedded by this run
    state: str = "running"  # running | stopped (limit reached) | swapped | unchanged
    started_over: bool = False  # a shadow column for another embedder was dropped


def offline_vectors_upgrade() -> Progress | None:
    """Re-embed vectors of the first hashing embedder (per-word Python, before numpy: other
    features, so other vectors) with today's, when this database's are theirs and the offline
    embedder is the configured one; None when there is nothing to upgrade. A database from
    before embedders were recorded (no label) counts as theirs when offline is configured."""
    spec = configured_embedder()
    stored = stored_embeddings()
    first_hashing = f"offline:{FIRST_HASHING_MODEL_NAME}:{spec.dimensions}"
    if (
        spec.provider != "offline"
        or stored is None
        or stored.dimensions != spec.dimensions
        or stored.embedder not in ("", first_hashing)
    ):
        return None
    if not _live_count():  # nothing to re-embed: the vectors to come are today's
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(f"COMMENT ON COLUMN {TABLE}.embedding IS %s", [spec.label])
        return None
    from memories.providers import HashingEmbedder

    return memories_reembed(embedder=HashingEmbedder(spec.dimensions), spec=spec)


def memories_reembed(
    *,
    embedder: Embedder,
    spec: EmbedderSpec,
    batch_size: int = 256,
    limit: int | None = None,
    force: bool = False,
    on_batch: Callable[[Progress], None] | None = None,
) -> Progress:
    """Give every live memory `embedder`'s vector of its content, then make those the stored
    vectors, while searches keep reading the old ones (see the module's opening).

    Resumable: run it again after any interruption and it goes on with the memories not done.
    `limit` stops after that many texts (before the swap). Unless `force`, nothing is done when
    the stored vectors are `spec`'s already. `on_batch` sees the progress after each batch.
    """
    if embedder.dimensions != spec.dimensions:
        raise ReembedError(f"the embedder gives {embedder.dimensions} dimensions, not {spec}")
    stored = stored_embeddings()
    if stored is None:
        raise ReembedError("the memories table does not exist yet: run `manage.py migrate` first")
    started_over = False
    if stored.next_dimensions is not None and (
        stored.next_embedder != spec.label or stored.next_dimensions != spec.dimensions
    ):
        _shadow_drop()  # half-made vectors of another embedder: of no use to this one
        started_over = True
        stored = StoredEmbeddings(stored.dimensions, stored.embedder)
    if stored.next_dimensions is None:
        if is_current(stored, spec) and not force:
            done = _live_count()
            return Progress(done, done, 0, state="unchanged", started_over=started_over)
        _shadow_create(spec)

    embedded = 0
    for _ in range(_MAX_PASSES):
        done, total = _counts()
        if done == total or (embedded and total - done <= batch_size):
            break  # what is left (written meanwhile) the swap embeds under its lock
        after = _FIRST_ID
        while rows := _undone(after=after, limit=batch_size):
            if limit is not None:
                if embedded >= limit:
                    return Progress(done, total, embedded, "stopped", started_over)
                rows = rows[: limit - embedded]
            vectors = embedder.embed([content for _, content, _ in rows])
            with transaction.atomic():
                done += _shadow_write(rows, vectors, check_content=True)
            embedded += len(rows)
            after = rows[-1][0]
            if on_batch is not None:
                on_batch(Progress(done, total, embedded, "running", started_over))

    embedded += _swap(embedder=embedder, spec=spec, batch_size=batch_size)
    total = _live_count()
    return Progress(total, total, embedded, "swapped", started_over)


def _shadow_create(spec: EmbedderSpec) -> None:
    with transaction.atomic(), connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        # Adding a column takes the table's strongest lock for an instant; queued behind a long
        # transaction it would hold up every search: give up instead, and say so.
        cursor.execute("SET LOCAL lock_timeout = '5s'")
        cursor.execute(_CHECK_DEFERRED)
        cursor.execute(f"ALTER TABLE {TABLE} ADD COLUMN {SHADOW} vector({int(spec.dimensions)})")
        cursor.execute(f"COMMENT ON COLUMN {TABLE}.{SHADOW} IS %s", [spec.label])
        cursor.execute(_STALE_FUNCTION)
        cursor.execute(_STALE_TRIGGER)


def _shadow_drop() -> None:
    with transaction.atomic(), connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '5s'")
        cursor.execute(_CHECK_DEFERRED)
        for statement in _DROP_STALE_TRIGGER:
            cursor.execute(statement)
        cursor.execute(f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS {SHADOW}")


def _live_count() -> int:
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {TABLE} WHERE embedding IS NOT NULL")
        return int(cursor.fetchone()[0])


def _counts() -> tuple[int, int]:
    """(done, total) over the live memories: those with a vector (a tombstone has none)."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FILTER (WHERE {SHADOW} IS NOT NULL), count(*) FROM {TABLE} "
            "WHERE embedding IS NOT NULL"
        )
        done, total = cursor.fetchone()
    return int(done), int(total)


def _undone(*, after: Any, limit: int) -> list[tuple[Any, str, str]]:
    """The next live memories without their new vector, in id order: (id, content, md5)."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            f"SELECT id, content, md5(content) FROM {TABLE} "
            f"WHERE embedding IS NOT NULL AND {SHADOW} IS NULL AND id > %s ORDER BY id LIMIT %s",
            [after, limit],
        )
        return list(cursor.fetchall())


def _shadow_write(
    rows: Sequence[tuple[Any, str, str]], vectors: list[list[float]], *, check_content: bool
) -> int:
    """Write the new vectors; with `check_content`, only where the content is still the one
    embedded (a write since then left the memory undone, for a later pass). Rows written."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {TABLE} AS m SET {SHADOW} = v.vector::vector
            FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS v(id, digest, vector)
            WHERE m.id = v.id AND m.embedding IS NOT NULL
              AND (NOT %s OR md5(m.content) = v.digest)
            """,
            [
                [row[0] for row in rows],
                [row[2] for row in rows],
                [vector_text(vector) for vector in vectors],
                check_content,
            ],
        )
        return int(cursor.rowcount)


def _swap(*, embedder: Embedder, spec: EmbedderSpec, batch_size: int) -> int:
    """Embed what is left under the table's lock, then make the new vectors the stored ones, in
    one transaction. Texts embedded."""
    attempts = 0
    while True:
        try:
            with transaction.atomic(), connections[DEFAULT_DB_ALIAS].cursor() as cursor:
                # Waiting for the lock queues every search behind it: a short wait, and retries.
                cursor.execute("SET LOCAL lock_timeout = '2s'")
                # Writes wait from here to the commit; nothing new becomes undone.
                cursor.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
                embedded = 0
                while rows := _undone(after=_FIRST_ID, limit=batch_size):
                    vectors = embedder.embed([content for _, content, _ in rows])
                    _shadow_write(rows, vectors, check_content=False)
                    embedded += len(rows)
                cursor.execute(_CHECK_DEFERRED)
                for statement in _DROP_STALE_TRIGGER:
                    cursor.execute(statement)
                cursor.execute(f"ALTER TABLE {TABLE} DROP COLUMN embedding")
                cursor.execute(f"ALTER TABLE {TABLE} RENAME COLUMN {SHADOW} TO embedding")
                cursor.execute(f"COMMENT ON COLUMN {TABLE}.embedding IS %s", [spec.label])
            break
        except OperationalError as exc:
            attempts += 1
            busy = isinstance(exc.__cause__, LockNotAvailable | DeadlockDetected)
            if not busy or attempts >= _SWAP_ATTEMPTS:
                raise
            time.sleep(attempts)
    # Dropping the old column dropped the approximate index: built again on the new one, after
    # the lock (an HNSW build takes minutes, and no write need wait for it).
    ann_index_create()
    return embedded
