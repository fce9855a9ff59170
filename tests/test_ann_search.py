"""A user with very many memories is searched through the approximate (HNSW) index: the same
results as the exact scan, new rows found before they reach the index, nothing sent to sync."""

from __future__ import annotations

import hashlib
import itertools
import random
import time

import pytest
from django.db import connection

from memories import selectors
from memories.ann_index import ann_index_create, ann_index_refresh
from memories.models import EndUser, Memory, vector_text
from memories.nearest import user_nearest_sql
from memories.providers.wiring import get_embedder
from tests.helpers import store_memories, wait_for

# Thresholds scaled down from production's 10,000 so a test builds its big users in a second.
BIG = 240
K = 20

_VOCABULARY = (
    "paris berlin tokyo lisbon hiking cycling chess piano violin garden tomatoes coffee tea "
    "sister brother daughter cat dog parrot engineer nurse teacher pilot novel poetry jazz "
    "opera marathon yoga climbing sailing kayak camping recipe curry pasta sushi allergy "
    "peanuts gluten birthday march june october project deadline manager meeting budget invoice "
    "travel flight hotel museum painting pottery knitting baking bread cheese wine running "
    "swimming tennis"
)
WORDS = _VOCABULARY.split()


def memory_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{' '.join(rng.sample(WORDS, 5))} note {seed}-{n}" for n in range(count)]


def add_memories(user: EndUser, texts: list[str]) -> list[Memory]:
    vectors = get_embedder().embed(texts)
    return Memory.objects.bulk_create(
        Memory(
            tenant=user.tenant,
            user=user,
            content=text,
            embedding=vector,
            content_hash=hashlib.sha256(text.encode()).hexdigest(),
        )
        for text, vector in zip(texts, vectors, strict=True)
    )


def exact_top(user: EndUser, query: str, k: int = K) -> list[str]:
    """The user's true top-k, by a statement that never names ann_indexed (so no index of it)."""
    vector = vector_text(get_embedder().embed([query])[0])
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT id FROM memories_memory
               WHERE user_id = %s AND deleted_at IS NULL AND valid_to IS NULL
               ORDER BY embedding <=> %s::vector, id LIMIT %s""",
            [user.id, vector, k],
        )
        return [str(row[0]) for row in cursor.fetchall()]


def vector_search(api, user: EndUser, query: str) -> list[str]:
    body = {"user_id": str(user.id), "query": query, "mode": "vector", "limit": K}
    response = api.post("/v1/memories/search", body, format="json")
    assert response.status_code == 200, response.content
    return [result["id"] for result in response.json()["results"]]


@pytest.fixture
def index_path():
    """The planner steered onto the HNSW index, as at production sizes: on a table this small it
    rightly finds a scan of every row and a sort cheaper (exact, and so no test of the index)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off"
        )
    yield
    with connection.cursor() as cursor:
        cursor.execute("RESET enable_seqscan; RESET enable_bitmapscan; RESET enable_sort")


@pytest.fixture
def users(settings, tenant) -> dict[str, EndUser]:
    """Five big users (BIG rows each: the index holds 1,200 rows, so a user's rows are a fifth of
    what the index scan meets) and a small one."""
    settings.SEARCH_ANN_MIN_MEMORIES = BIG
    made = {}
    for seed, name in enumerate(["alice", "bob", "carol", "dave", "erin", "small"]):
        made[name] = EndUser.objects.create(tenant=tenant, external_id=name)
        add_memories(made[name], memory_texts(seed, 60 if name == "small" else BIG))
    return made


QUERIES = ["hiking in paris", "my sister plays the violin", "peanut allergy", "jazz and wine"]


@pytest.mark.django_db(transaction=True)
def test_a_big_users_search_goes_through_the_index_and_finds_the_exact_top_k(
    api, users, index_path, settings
):
    # pgvector's default ef_search: the index scan's first 40 candidates hold ~8 of alice's rows;
    # only the iterative scan, going on past the other users' rows, finds all 20.
    settings.SEARCH_ANN_EF_SEARCH = 40
    refreshed = ann_index_refresh()
    assert refreshed.users_marked == 5 and refreshed.rows_indexed == 5 * BIG
    assert not refreshed.rows_left
    users["alice"].refresh_from_db()
    users["small"].refresh_from_db()
    assert users["alice"].ann_indexed and not users["small"].ann_indexed
    assert not Memory.objects.filter(user=users["small"], ann_indexed=True).exists()
    for query in QUERIES:
        assert vector_search(api, users["alice"], query) == exact_top(users["alice"], query)
        assert vector_search(api, users["small"], query) == exact_top(users["small"], query)
    assert "memory_embedding_ann" in leg_plan(users["alice"])
    # A small user's statement holds the index scan, but its gate stops it before it starts.
    small_plan = leg_plan(users["small"])
    assert "memory_embedding_ann" in small_plan and "never executed" in small_plan


def leg_plan(user: EndUser) -> str:
    vector = vector_text(get_embedder().embed(["hiking in paris"])[0])
    sql, params = user_nearest_sql(
        vector="%s::vector", vector_params=[vector], user_id=user.id, limit=K
    )
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    # Each half's scan, and whether it ran.
    return "\n".join(line for line in plan.splitlines() if "Scan" in line or "never" in line)


@pytest.mark.django_db(transaction=True)
def test_rows_written_since_the_refresh_are_found_and_deleted_ones_are_not(api, users, index_path):
    alice = users["alice"]
    ann_index_refresh()
    query = "kayak camping sushi opera pottery"
    [newest] = store_memories(alice, query)  # outside the index until the next refresh
    assert not Memory.objects.get(pk=newest.pk).ann_indexed
    found = vector_search(api, alice, query)
    assert found[0] == str(newest.pk) and found == exact_top(alice, query)
    # An indexed row deleted through the API is gone from results at once.
    indexed = exact_top(alice, query)[1]
    assert Memory.objects.get(pk=indexed).ann_indexed
    assert api.delete(f"/v1/memories/{indexed}").status_code in (200, 204)
    found = vector_search(api, alice, query)
    assert indexed not in found and found == exact_top(alice, query)
    # The next refresh moves the new row in; it is still first.
    assert ann_index_refresh().rows_indexed == 1
    assert Memory.objects.get(pk=newest.pk).ann_indexed
    assert vector_search(api, alice, query)[0] == str(newest.pk)


@pytest.mark.django_db(transaction=True)
def test_an_indexed_memory_rewritten_leaves_the_index_until_the_next_refresh(
    api, users, index_path
):
    alice = users["alice"]
    ann_index_refresh()
    query = "kayak camping sushi opera pottery"
    target = exact_top(alice, "hiking in paris")[0]
    response = api.patch(f"/v1/memories/{target}", {"content": query}, format="json")
    assert response.status_code == 200, response.content
    # Its new vector is not in the index (no client's write waits for an HNSW insert): the exact
    # half finds it.
    assert not Memory.objects.get(pk=target).ann_indexed
    assert vector_search(api, alice, query)[0] == target
    assert ann_index_refresh().rows_indexed == 1
    assert Memory.objects.get(pk=target).ann_indexed
    assert vector_search(api, alice, query)[0] == target


@pytest.mark.django_db(transaction=True)
def test_a_big_user_stays_big_whatever_a_stale_save_writes(users):
    ann_index_refresh()
    alice = EndUser.objects.get(pk=users["alice"].pk)
    alice.ann_indexed = False  # an instance read before the mark, saved after it
    alice.save()
    assert EndUser.objects.get(pk=alice.pk).ann_indexed
    EndUser.objects.filter(pk=alice.pk).update(ann_indexed=False)
    assert EndUser.objects.get(pk=alice.pk).ann_indexed


@pytest.mark.django_db(transaction=True)
def test_without_the_index_no_user_is_marked_and_reembed_builds_it_again(users):
    # Embeddings wider than pgvector's HNSW takes (2,000 dimensions) leave the index unbuilt.
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX memory_embedding_ann")
    try:
        assert ann_index_refresh().users_marked == 0
        assert not EndUser.objects.filter(ann_indexed=True).exists()
    finally:
        ann_index_create()  # what reembed calls after its swap
    assert ann_index_refresh().users_marked == 5


@pytest.mark.django_db(transaction=True)
def test_a_jobs_neighbours_for_a_big_user_are_the_exact_ones(users, index_path):
    ann_index_refresh()
    alice = users["alice"]
    vectors = get_embedder().embed(QUERIES)
    found = selectors.memory_nearest_for_many(user_id=alice.id, vectors=vectors, per_vector=5)
    expected = list(
        dict.fromkeys(itertools.chain.from_iterable(exact_top(alice, q, 5) for q in QUERIES))
    )
    assert [memory_id for memory_id, _ in found] == expected


@pytest.mark.django_db(transaction=True)
def test_moving_rows_into_the_index_changes_nothing_a_client_syncs(api, users):
    alice = users["alice"]
    before = {
        row["id"]: row
        for row in Memory.objects.filter(user=alice).values("id", "version", "updated_at")
    }
    first = api.get("/v1/sync", {"user_id": str(alice.id), "limit": 1000}).json()
    while first["has_more"]:
        first = api.get(
            "/v1/sync", {"user_id": str(alice.id), "limit": 1000, "since": first["next_cursor"]}
        ).json()
    assert ann_index_refresh().rows_indexed == 5 * BIG
    after = api.get("/v1/sync", {"user_id": str(alice.id), "since": first["next_cursor"]}).json()
    assert after["changes"] == []
    moved = Memory.objects.filter(user=alice).values("id", "version", "updated_at", "ann_indexed")
    assert all(row["ann_indexed"] for row in moved)
    assert {row["id"]: {**row, "ann_indexed": None} for row in moved} == {
        key: {**row, "ann_indexed": None} for key, row in before.items()
    }


@pytest.mark.django_db(transaction=True)
def test_no_user_is_marked_below_the_threshold_or_when_it_is_off(settings, users):
    settings.SEARCH_ANN_MIN_MEMORIES = 0  # off
    assert ann_index_refresh().users_marked == 0
    settings.SEARCH_ANN_MIN_MEMORIES = BIG + 1
    assert ann_index_refresh().users_marked == 0
    assert not EndUser.objects.filter(ann_indexed=True).exists()
    assert not Memory.objects.filter(ann_indexed=True).exists()


@pytest.mark.django_db(transaction=True)
def test_beat_moves_a_big_users_rows_into_the_index(tenant, start_worker):
    user = EndUser.objects.create(tenant=tenant, external_id="prolific")
    add_memories(user, memory_texts(7, 30))
    start_worker(with_beat=True, SEARCH_ANN_MIN_MEMORIES="30", SEARCH_ANN_REFRESH_SECONDS="0.5")
    wait_for(
        lambda: not Memory.objects.filter(user=user, ann_indexed=False).exists(),
        timeout=60,
        what="the worker's beat moved the user's rows into the index",
    )
    user.refresh_from_db()
    assert user.ann_indexed
    # The rows of a write that comes later follow at the next run.
    add_memories(user, memory_texts(8, 3))
    started = time.monotonic()
    wait_for(
        lambda: not Memory.objects.filter(user=user, ann_indexed=False).exists(),
        timeout=60,
        what="the later rows moved in",
    )
    assert time.monotonic() - started < 60
