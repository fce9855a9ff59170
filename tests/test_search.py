"""Semantic search: the true top-k of one user, ranked by pgvector, with filters and threshold."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from memories import accounts, erasure, selectors
from memories.providers.wiring import get_embedder
from tests.helpers import store_memories

pytestmark = pytest.mark.django_db

FACTS = [
    "Lives in Paris",
    "Works at Acme as an engineer",
    "Likes hiking in the mountains",
    "Has a cat named Tom",
    "Favorite color is blue",
]


def search(api, user, query: str, **extra) -> list[dict]:
    body = {"user_id": str(user.id), "query": query, **extra}
    response = api.post("/v1/memories/search", body, format="json")
    assert response.status_code == 200, response.content
    return response.json()["results"]


def test_results_are_ranked_by_cosine_similarity_with_scores(api, end_user) -> None:
    store_memories(end_user, *FACTS)
    results = search(api, end_user, "a cat named Tom", limit=5)
    assert results[0]["content"] == "Has a cat named Tom"
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1.0001
    assert {"id", "content", "score", "metadata", "created_at", "updated_at"} <= results[0].keys()


def test_search_never_returns_another_users_memories(api, tenant, end_user) -> None:
    bob = accounts.end_user_create(tenant=tenant, external_id="bob")
    store_memories(bob, *["Has a cat named Tom"] * 30)
    store_memories(end_user, *FACTS)
    results = search(api, end_user, "a cat named Tom", limit=10)
    assert len(results) == len(FACTS)
    assert all(r["user_id"] == str(end_user.id) for r in results)


def test_deleted_memories_are_not_found(api, end_user) -> None:
    cat = store_memories(end_user, *FACTS)[3]
    erasure.memory_forget(tenant_id=cat.tenant_id, memory_id=cat.id)
    assert "Has a cat named Tom" not in [r["content"] for r in search(api, end_user, "cat")]


def test_filters_on_agent_session_type_and_metadata(api, end_user) -> None:
    store_memories(
        end_user,
        "Likes tea",
        agent_id="a1",
        session_id="s1",
        type="preference",
        metadata={"source": "chat", "lang": "en"},
    )
    store_memories(
        end_user, "Likes coffee", agent_id="a2", session_id="s2", metadata={"source": "email"}
    )
    tea = [
        {"agent_id": "a1"},
        {"session_id": "s1"},
        {"type": "preference"},
        {"metadata": {"source": "chat"}},
    ]
    for filters in tea:
        assert [r["content"] for r in search(api, end_user, "likes", filters=filters)] == [
            "Likes tea"
        ], filters
    assert search(api, end_user, "likes", filters={"metadata": {"source": "fax"}}) == []


def test_threshold_drops_weak_matches(api, end_user) -> None:
    store_memories(end_user, *FACTS)
    strong = search(api, end_user, "Has a cat named Tom", threshold=0.9)
    assert [r["content"] for r in strong] == ["Has a cat named Tom"]


def test_bad_search_input_is_400_naming_the_field(api, end_user) -> None:
    for body, field in [
        ({"user_id": str(end_user.id)}, "query"),
        ({"user_id": str(end_user.id), "query": "x", "limit": 0}, "limit"),
        ({"user_id": str(end_user.id), "query": "x", "threshold": "high"}, "threshold"),
        ({"user_id": "nope", "query": "x"}, "user_id"),
        ({"user_id": str(end_user.id), "query": "x", "filters": {"type": "secret"}}, "filters"),
    ]:
        response = api.post("/v1/memories/search", body, format="json")
        assert response.status_code == 400 and field in response.json()["fields"], body


def test_top_k_stays_exact_after_many_searches(tenant, end_user) -> None:
    # psycopg may prepare a statement after 5 runs and PostgreSQL may then pick one generic plan
    # for all users; whatever the plan, every search must return the user's full top-k.
    users = [accounts.end_user_create(tenant=tenant, external_id=f"u{i}") for i in range(4)]
    for n, user in enumerate(users):
        store_memories(user, *[f"Fact {k} about person {n}" for k in range(25)])
    query = get_embedder().embed(["Fact about person"])[0]
    for round_number in range(12):
        for user in users:
            results = selectors.memory_search(
                user=user, query_vector=query, limit=20, filters={}, threshold=None
            )
            assert len(results) == 20, round_number
            assert all(m.user_id == user.id for m in results)


def test_nearest_memories_for_all_facts_come_from_one_query(end_user) -> None:
    store_memories(end_user, *FACTS)
    vectors = get_embedder().embed(["cat", "Paris", "blue"])
    with CaptureQueriesContext(connection) as queries:
        found = selectors.memory_nearest_for_many(
            user_id=end_user.id, vectors=vectors, per_vector=2
        )
    assert len(queries) == 1
    contents = [content for _, content in found]
    assert len(contents) == len(set(contents))
    assert {"Has a cat named Tom", "Lives in Paris", "Favorite color is blue"} <= set(contents)
