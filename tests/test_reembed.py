"""`manage.py reembed`: every live memory gets the configured embedder's vector, in batches, with
searches answered meanwhile and writes made meanwhile not missed; a killed run resumes; and a
process whose embedder's dimension is not the stored one is refused, naming reembed."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings

from memories import erasure, memory_writes, reembed
from memories.checks import embedding_dimensions_check
from memories.models import Memory
from memories.providers import HashingEmbedder
from memories.providers.wiring import get_embedder
from tests.helpers import store_memories
from tests.workers import BASE_DIR

pytestmark = pytest.mark.django_db

FACTS = [
    "Lives in Paris",
    "Works at Acme as an engineer",
    "Likes hiking in the mountains",
    "Has a cat named Tom",
    "Favorite color is blue",
    "Plays the guitar on weekends",
    "Is allergic to peanuts",
]
NEW = 16  # the new embedder: the hashing one with another dimension, so every vector changes


class Counting:
    """The new embedder, remembering every text it was given."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(NEW)
        self.dimensions = NEW
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.texts += texts
        return self.inner.embed(texts)


def _configure_new(settings) -> reembed.EmbedderSpec:
    """Configure the new dimension, as the operator does before running reembed (after the
    memories were written with the old one)."""
    settings.EMBEDDING_DIMENSIONS = NEW
    get_embedder.cache_clear()
    return reembed.configured_embedder()


def _vectors() -> dict[str, list[float] | None]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT content, embedding::text FROM memories_memory")
        return {
            content: None if text is None else [float(x) for x in text.strip("[]").split(",")]
            for content, text in cursor.fetchall()
        }


def _close(a: list[float] | None, b: list[float]) -> bool:
    return (
        a is not None
        and len(a) == len(b)
        and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))
    )


def _search(api, user, query: str) -> list[str]:
    body = {"user_id": str(user.id), "query": query, "limit": 3, "mode": "vector"}
    response = api.post("/v1/memories/search", body, format="json")
    assert response.status_code == 200, response.content
    return [r["content"] for r in response.json()["results"]]


def test_every_live_memory_gets_the_new_embedders_vector_and_the_column_is_swapped(
    api, end_user, settings
) -> None:
    memories = store_memories(end_user, *FACTS)  # written by the old embedder (384 dimensions)
    new_embedder = _configure_new(settings)
    erasure.memory_forget(tenant_id=end_user.tenant_id, memory_id=memories[-1].id)

    result = reembed.memories_reembed(embedder=Counting(), spec=new_embedder, batch_size=2)

    assert (result.state, result.done, result.total) == ("swapped", 6, 6)
    stored = reembed.stored_embeddings()
    assert stored == reembed.StoredEmbeddings(NEW, "offline:hashing2:16")
    vectors = _vectors()
    for fact in FACTS[:-1]:
        assert _close(vectors[fact], HashingEmbedder(NEW).embed([fact])[0]), fact
    assert vectors[""] is None  # the tombstone stays without a vector
    assert _search(api, end_user, "a cat named Tom")[0] == "Has a cat named Tom"
    assert embedding_dimensions_check(databases=["default"]) == []


def test_the_approximate_index_is_built_again_on_the_new_column(api, end_user, settings) -> None:
    from memories.ann_index import ann_index_refresh

    settings.SEARCH_ANN_MIN_MEMORIES = len(FACTS)  # the user is big: their rows are indexed
    store_memories(end_user, *FACTS)
    assert ann_index_refresh().rows_indexed == len(FACTS)
    reembed.memories_reembed(embedder=Counting(), spec=_configure_new(settings), batch_size=2)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'memory_embedding_ann'")
        found = cursor.fetchone()
        # Forced onto the index: on a table this small PostgreSQL would rightly scan it.
        cursor.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
    try:
        assert found is not None, "dropping the old column dropped the index"
        assert "hnsw" in found[0] and "vector_cosine_ops" in found[0] and "ann_indexed" in found[0]
        assert _search(api, end_user, "a cat named Tom")[0] == "Has a cat named Tom"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET enable_seqscan; RESET enable_bitmapscan")


def test_a_run_interrupted_after_one_batch_resumes_without_redoing_what_it_did(
    end_user, settings
) -> None:
    store_memories(end_user, *FACTS)
    new_embedder = _configure_new(settings)
    first = Counting()

    def killed(progress: reembed.Progress) -> None:
        raise KeyboardInterrupt  # as if the process died after its first batch committed

    with pytest.raises(KeyboardInterrupt):
        reembed.memories_reembed(embedder=first, spec=new_embedder, batch_size=3, on_batch=killed)
    stored = reembed.stored_embeddings()
    assert stored is not None and (stored.dimensions, stored.next_embedder) == (
        384,
        "offline:hashing2:16",
    )

    second = Counting()
    result = reembed.memories_reembed(embedder=second, spec=new_embedder, batch_size=3)
    assert result.state == "swapped" and result.embedded == 4
    assert sorted(first.texts + second.texts) == sorted(FACTS)  # each embedded once


def test_limit_stops_before_the_swap_and_the_next_run_goes_on(end_user, settings) -> None:
    store_memories(end_user, *FACTS)
    new_embedder = _configure_new(settings)
    first = reembed.memories_reembed(embedder=Counting(), spec=new_embedder, limit=3, batch_size=2)
    assert (first.state, first.done, first.total, first.embedded) == ("stopped", 3, 7, 3)
    second = Counting()
    assert reembed.memories_reembed(embedder=second, spec=new_embedder).state == "swapped"
    assert len(second.texts) == 4


def test_search_keeps_answering_with_the_old_vectors_while_it_runs(api, end_user, settings) -> None:
    store_memories(end_user, *FACTS)
    new_embedder = _configure_new(settings)
    answers: list[list[str]] = []

    def search_meanwhile(progress: reembed.Progress) -> None:
        # The service still running with the old configuration, as during a real reembed.
        with override_settings(EMBEDDING_DIMENSIONS=384):
            get_embedder.cache_clear()
            answers.append(_search(api, end_user, "a cat named Tom"))
        get_embedder.cache_clear()

    reembed.memories_reembed(
        embedder=Counting(), spec=new_embedder, batch_size=2, on_batch=search_meanwhile
    )
    assert len(answers) == 4
    assert all(answer[0] == "Has a cat named Tom" for answer in answers)


def test_writes_made_while_it_runs_are_not_missed(end_user, settings) -> None:
    memories = store_memories(end_user, *FACTS)
    new_embedder = _configure_new(settings)
    old = HashingEmbedder(384)
    by_content = {m.content: m for m in memories}

    class WrittenMeanwhile(Counting):
        """The old service writes between a batch's read and its write of the new vectors."""

        def embed(self, texts: list[str]) -> list[list[float]]:
            if not self.texts:
                memory_writes.memory_update(
                    tenant_id=end_user.tenant_id,
                    memory_id=by_content[texts[0]].id,
                    embedder=old,
                    content="Lives in Lyon",
                )
            return super().embed(texts)

    def after_first_batch(progress: reembed.Progress) -> None:
        if progress.embedded != 2:
            return
        done_id = _one_done_id()
        memory_writes.memory_update(
            tenant_id=end_user.tenant_id, memory_id=done_id, embedder=old, content="Has two cats"
        )
        with override_settings(EMBEDDING_DIMENSIONS=384):  # the old service, still writing
            get_embedder.cache_clear()
            store_memories(end_user, "Speaks Japanese")
        get_embedder.cache_clear()
        # A memory the first batch did not read (one it read may be the one now in Lyon).
        untouched = [fact for fact in FACTS if fact not in embedder.texts]
        erasure.memory_forget(tenant_id=end_user.tenant_id, memory_id=by_content[untouched[-1]].id)

    embedder = WrittenMeanwhile()
    result = reembed.memories_reembed(
        embedder=embedder, spec=new_embedder, batch_size=2, on_batch=after_first_batch
    )

    assert result.state == "swapped"
    live = Memory.objects.filter(deleted_at__isnull=True).values_list("content", flat=True)
    vectors = _vectors()
    assert {"Lives in Lyon", "Has two cats", "Speaks Japanese"} <= set(live)
    for content in live:
        assert _close(vectors[content], HashingEmbedder(NEW).embed([content])[0]), content
    assert vectors[""] is None


def _one_done_id() -> object:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM memories_memory WHERE embedding_next IS NOT NULL LIMIT 1")
        return cursor.fetchone()[0]


def test_a_run_for_another_embedder_starts_over(end_user, settings) -> None:
    store_memories(end_user, *FACTS)
    new_embedder = _configure_new(settings)
    reembed.memories_reembed(embedder=Counting(), spec=new_embedder, limit=2)
    settings.EMBEDDING_DIMENSIONS = 8
    result = reembed.memories_reembed(
        embedder=HashingEmbedder(8), spec=reembed.configured_embedder()
    )
    assert (result.state, result.started_over, result.embedded) == ("swapped", True, 7)
    assert reembed.stored_embeddings() == reembed.StoredEmbeddings(8, "offline:hashing2:8")


def test_the_vectors_of_the_configured_embedder_are_left_alone(end_user) -> None:
    store_memories(end_user, *FACTS)
    spec = reembed.configured_embedder()
    assert reembed.stored_embeddings() == reembed.StoredEmbeddings(384, spec.label)
    result = reembed.memories_reembed(embedder=HashingEmbedder(384), spec=spec)
    assert result.state == "unchanged"


def test_an_embedder_of_another_dimension_is_refused_naming_reembed(settings) -> None:
    settings.EMBEDDING_DIMENSIONS = 768
    [error] = embedding_dimensions_check(databases=["default"])
    assert error.id == "memories.E001" and "manage.py reembed" in error.hint
    assert "384-dimension" in error.msg
    # What migrate (make run's first step) and `manage.py check --database default` run.
    with pytest.raises(SystemCheckError, match="manage.py reembed"):
        call_command("check", databases=["default"])
    assert embedding_dimensions_check(databases=None) == []  # no database, no verdict


def test_another_embedder_of_the_same_dimension_is_a_warning_naming_reembed(settings) -> None:
    settings.EMBEDDING_PROVIDER = "openai"
    [warning] = embedding_dimensions_check(databases=["default"])
    assert warning.id == "memories.W001" and "manage.py reembed" in warning.hint


def test_the_first_hashing_embedders_vectors_warn_only_where_migrate_will_not_upgrade_them(
    settings,
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("COMMENT ON COLUMN memories_memory.embedding IS 'offline:hashing:384'")
    # Offline configured: migration 0015 re-embeds them (the checks run before it): no warning.
    assert embedding_dimensions_check(databases=["default"]) == []
    settings.EMBEDDING_PROVIDER = "openai"
    [warning] = embedding_dimensions_check(databases=["default"])
    assert warning.id == "memories.W001"


def test_the_command_shows_a_progress_bar_and_what_it_did(end_user, settings) -> None:
    store_memories(end_user, *FACTS)
    _configure_new(settings)
    out, err = io.StringIO(), io.StringIO()
    call_command("reembed", "--batch-size", "3", stdout=out, stderr=err)
    assert "reembed [" in err.getvalue() and "7/7 100%" in err.getvalue()
    assert "7 memories re-embedded with offline:hashing2:16" in out.getvalue()
    status = io.StringIO()
    call_command("reembed", "--status", stdout=status)
    assert "stored: offline:hashing2:16 (vector(16))" in status.getvalue()


def test_a_changed_dimension_is_no_model_change_for_makemigrations(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MEMORY_TEST_REDIS",)}
    env |= {
        "DJANGO_SETTINGS_MODULE": "memoryproject.settings",
        "MEMORY_VAR_DIR": str(tmp_path),
        "SECRET_KEY": "k" * 50,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "EMBEDDING_DIMENSIONS": "768",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes detected" in done.stdout


def test_vectors_of_the_first_hashing_embedder_are_upgraded_and_others_left_alone(
    end_user,
) -> None:
    # What a database from before the numpy embedder holds: its label, and vectors unlike today's.
    store_memories(end_user, *FACTS)
    Memory.objects.update(embedding=[1.0] + [0.0] * 383)
    with connection.cursor() as cursor:
        cursor.execute("COMMENT ON COLUMN memories_memory.embedding IS 'offline:hashing:384'")
    assert reembed.offline_vectors_upgrade() is not None
    today = HashingEmbedder(384)
    assert all(_close(_vectors()[f], today.embed([f])[0]) for f in FACTS)
    assert reembed.stored_embeddings().embedder == "offline:hashing2:384"
    assert reembed.offline_vectors_upgrade() is None  # done once

    # Vectors another embedder wrote are not the offline embedder's to touch.
    Memory.objects.update(embedding=[1.0] + [0.0] * 383)
    with connection.cursor() as cursor:
        cursor.execute("COMMENT ON COLUMN memories_memory.embedding IS 'openai:small:384'")
    assert reembed.offline_vectors_upgrade() is None
    assert all(v == [1.0] + [0.0] * 383 for v in _vectors().values())
