"""Semantic search: the true top-k of one user, ranked by pgvector, with filters and threshold."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from memories import accounts, erasure, selectors
from memories import search as search_service
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
        (
            {"user_id": str(end_user.id), "query": "x", "filters": {"type": "secret"}},
            "filters.type",
        ),
    ]:
        response = api.post("/v1/memories/search", body, format="json")
        assert response.status_code == 400 and field in response.json()["fields"], body


def test_top_k_stays_exact_after_many_searches(tenant, end_user) -> None:
    # psycopg may prepare a statement after 5 runs and PostgreSQL may then pick one generic plan
    # for all users; whatever the plan, every search must return the user's full top-k.
    users = [accounts.end_user_create(tenant=tenant, external_id=f"u{i}") for i in range(4)]
    for n, user in enumerate(users):
        store_memories(user, *[f"Fact {k} about person {n}" for k in range(25)])
    for round_number in range(12):
        for user in users:
            results = search_service.memory_search(
                user=user, query="Fact about person", limit=20, filters={}, threshold=None,
                embedder=get_embedder(), mode="vector",
            )  # fmt: skip
            assert len(results) == 20, round_number
            assert all(f.memory["user_id"] == user.id for f in results)


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


# --- Hybrid: by meaning and by words, fused ------------------------------------------------------


def test_results_carry_a_fused_score_the_similarity_and_each_retrievers_rank(api, end_user) -> None:
    store_memories(end_user, *FACTS)
    [best, *rest] = search(api, end_user, "a cat named Tom", limit=5)
    assert best["content"] == "Has a cat named Tom"
    assert best["why"] == {"vector": 1, "keyword": 1} and best["score"] == 1.0
    assert 0.5 < best["similarity"] <= 1.0001
    assert all(0 <= r["score"] <= best["score"] for r in rest)
    assert all(set(r["why"]) <= {"vector", "keyword"} and r["similarity"] is not None for r in rest)
    [only_vector] = search(api, end_user, "a cat named Tom", limit=1, mode="vector")
    assert only_vector["why"] == {"vector": 1}


def test_keyword_retrieval_ors_the_words_of_a_natural_question(api, end_user) -> None:
    store_memories(end_user, *FACTS)
    # AND of every word (plainto_tsquery) would need "days" and "currently" in the memory too.
    found = search(api, end_user, "Where is she currently working these days?", mode="keyword")
    assert [r["content"] for r in found] == ["Works at Acme as an engineer"]
    assert found[0]["why"] == {"keyword": 1} and found[0]["similarity"] is None


def test_a_query_of_stop_words_finds_nothing_by_keyword_and_hybrid_still_answers(
    api, end_user
) -> None:
    store_memories(end_user, *FACTS)
    assert search(api, end_user, "what is it that they have", mode="keyword") == []
    assert len(search(api, end_user, "what is it that they have", limit=3)) == 3


def test_min_score_and_the_modes_input_is_checked(api, end_user) -> None:
    store_memories(end_user, *FACTS)
    strong = search(api, end_user, "a cat named Tom", min_score=0.9)
    assert [r["content"] for r in strong] == ["Has a cat named Tom"]
    body = {"user_id": str(end_user.id), "query": "cat"}
    for extra, field in [
        ({"mode": "psychic"}, "mode"),
        ({"mode": "keyword", "threshold": 0.5}, "threshold"),
        ({"min_score": 2}, "min_score"),
    ]:
        response = api.post("/v1/memories/search", {**body, **extra}, format="json")
        assert response.status_code == 400 and field in response.json()["fields"], extra


# Memories and questions asked in other words than they were written (another form of the same
# word, a question around it): what keyword search with stemming finds and hashed words do not.
LABELLED = {
    "Went hiking in the Alps last summer": ["Has she hiked in the mountains?"],
    "Is learning to cook Thai food": ["What does she cook?"],
    "Married Sam in 2019": ["Who is she marrying?", "When did the marriage happen?"],
    "Runs a small bakery downtown": ["Does she run a business?"],
    "Plays the violin in an orchestra": ["Which instruments does she play?"],
    "Travelled to Japan for work": ["Has she travelled abroad?"],
    "Reads science fiction novels": ["What is she reading lately?"],
    "Swims every morning before work": ["Is swimming part of her routine?"],
    "Volunteers at the animal shelter": ["Where does she volunteer?"],
    "Paints watercolour landscapes": ["What has she painted?"],
    "Studies German at night school": ["Which language is she studying?"],
    "Owns two rescue dogs": ["Does she own pets?"],
}


def _recall_at(api, user, mode: str, k: int, expected: dict[str, str]) -> float:
    hits = 0
    for question, memory in expected.items():
        found = [r["content"] for r in search(api, user, question, limit=k, mode=mode)]
        hits += memory in found
    return hits / len(expected)


def test_on_a_labelled_set_hybrid_beats_vector_and_is_at_least_as_good_as_keyword(
    api, end_user
) -> None:
    store_memories(end_user, *LABELLED, *FACTS)
    expected = {q: memory for memory, questions in LABELLED.items() for q in questions}
    recall = {mode: _recall_at(api, end_user, mode, 3, expected) for mode in search_modes()}
    assert recall["hybrid"] >= recall["keyword"] and recall["hybrid"] > recall["vector"], recall


def search_modes() -> tuple[str, ...]:
    from memories.search import MODES

    return MODES


def test_a_rare_word_outweighs_words_most_memories_share(api, end_user) -> None:
    # Chatty memories share "really" and "like"; one names Kyoto. ts_rank_cd alone counts every
    # word alike, so two common words beat the rare one; weighted by rarity, the rare one wins.
    chatter = [f"Really liked the {thing}, I really like it" for thing in ("film", "tea", "walk")]
    store_memories(end_user, *(chatter * 6), "Spent a week in Kyoto")
    (first, *_) = search(api, end_user, "Did she really like Kyoto?", mode="keyword")
    assert first["content"] == "Spent a week in Kyoto"


def test_searches_of_two_users_in_turn_each_find_their_own_memories(api, tenant, end_user) -> None:
    # A plain search's statement is compiled once and reused: each search must still run on its
    # own user and its own query vector, in every mode.
    bob = accounts.end_user_create(tenant=tenant, external_id="bob")
    store_memories(end_user, "Has a cat named Tom", "Lives in Paris")
    store_memories(bob, "Has a dog named Rex", "Lives in Oslo")
    for mode in ("vector", "hybrid", "keyword"):
        for user, home, pet in (
            (end_user, "Paris", "cat"),
            (bob, "Oslo", "dog"),
            (end_user, "Paris", "cat"),
        ):
            for query, expected in ((f"Lives in {home}", home), (f"named {pet}", pet)):
                results = search(api, user, query, mode=mode)
                assert {r["user_id"] for r in results} == {str(user.id)}, (mode, query)
                assert expected in results[0]["content"], (mode, query, results)


def test_a_query_of_stop_words_only_is_ranked_by_meaning_alone(api, end_user) -> None:
    # No word to match: hybrid's scores are normalised by the vector leg alone (its first place
    # scores 1, not the share a keyword leg would have added); a keyword search finds nothing,
    # and still answers 404 for a user the tenant does not have.
    store_memories(end_user, *FACTS)
    first = search(api, end_user, "What is it?", mode="hybrid")[0]
    assert (first["score"], first["why"]) == (1.0, {"vector": 1})
    assert search(api, end_user, "What is it?", mode="keyword") == []
    body = {"user_id": str(uuid.uuid4()), "query": "What is it?", "mode": "keyword"}
    assert api.post("/v1/memories/search", body, format="json").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_a_search_is_one_statement_in_every_mode_and_writes_nothing(api, end_user) -> None:
    from memories.events.stream import STREAM_KEY, redis_client
    from memories.models import OutboxEvent

    store_memories(end_user, *FACTS)
    body = {"user_id": str(end_user.id), "query": "Where does she work?"}
    for mode in ("vector", "hybrid", "keyword"):
        before = redis_client().xlen(STREAM_KEY)
        with CaptureQueriesContext(connection) as queries:
            search_service.memory_search(
                user=end_user, query=body["query"], limit=5, filters={}, threshold=None,
                embedder=get_embedder(), mode=mode,
            )  # fmt: skip
        # One statement (the keyword leg's word weights in it too); no write.
        assert len(queries) == 1, [q["sql"][:80] for q in queries]
        assert not any(q["sql"].lstrip().upper().startswith("INSERT") for q in queries)
        assert redis_client().xlen(STREAM_KEY) == before + 1  # its search.performed, at once
        # Through the API too (the key's read cached by a first call): the user is read in the
        # search's own statement, not before it.
        api.post("/v1/memories/search", {**body, "mode": mode}, format="json")
        with CaptureQueriesContext(connection) as queries:
            response = api.post("/v1/memories/search", {**body, "mode": mode}, format="json")
        assert response.status_code == 200
        assert len(queries) == 1, [q["sql"][:80] for q in queries]
    assert not OutboxEvent.objects.filter(event_type="search.performed").exists()


def test_a_search_result_shows_each_memory_exactly_as_get_does(api, tenant, end_user) -> None:
    """Results are written from rows, not model instances: the same keys and JSON as
    `GET /v1/memories/{id}` for every kind of memory (a list's items, a counter's value, a
    shared memory's null user, a conflicted one, metadata, clocks, dates)."""
    from datetime import UTC, datetime

    from memories import merges
    from memories.models import Memory

    at = datetime(2025, 5, 17, 8, 30, 15, 123456, tzinfo=UTC)
    store_memories(end_user, "Likes green tea", metadata={"mood": "calm", "n": [1, 2.5, None]},
                   agent_id="a1", session_id="s1", occurred_at=at, written_at=at)  # fmt: skip
    store_memories(
        end_user,
        "Shopping list: tea, milk",
        type=Memory.Type.LIST,
        merge_rule=Memory.MergeRule.MANUAL,
        vector_clock={"a1": 2, "b": 1},
        conflicted=True,
        state=merges.orset_add(merges.orset_empty(), agent_id="a1", counter=1,
                               values=["tea", {"brand": "x"}], written_at=at),
    )  # fmt: skip
    store_memories(
        end_user,
        "Cups of tea today",
        type=Memory.Type.COUNTER,
        state=merges.counter_increment(merges.counter_empty(), agent_id="a1", by=3),
    )
    shared = store_memories(end_user, "The office serves tea at four", scope=Memory.Scope.TENANT)
    Memory.objects.filter(pk=shared[0].pk).update(user=None)
    for mode in ("hybrid", "vector", "keyword"):
        results = search(api, end_user, "tea", mode=mode, include_shared=True, limit=10)
        assert len(results) == 4, mode
        for result in results:
            shown = api.get(f"/v1/memories/{result['id']}").json()
            assert {k: v for k, v in result.items() if k not in ("score", "similarity", "why")} == (
                shown
            ), mode
            assert list(result)[: len(shown)] == list(shown)  # the same keys in the same order


@pytest.mark.parametrize("query", ["tea", "the"])  # "the": no words to search, no legs to run
@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
def test_a_search_reads_the_user_and_the_keys_right_in_its_own_statement(
    api, other_api, tenant, end_user, mode, query
) -> None:
    """The user is read inside the search: another tenant's user or one being erased is a 404,
    an agent key not granted the user a 403 naming the grant, and the user an agent created
    its own (200)."""
    from django.utils import timezone
    from rest_framework.test import APIClient

    from memories.models import EndUser

    store_memories(end_user, "Likes green tea")
    body = {"user_id": str(end_user.id), "query": query, "mode": mode}
    assert api.post("/v1/memories/search", body, format="json").status_code == 200
    assert other_api.post("/v1/memories/search", body, format="json").status_code == 404

    _, raw_key = accounts.api_key_create(tenant=tenant, name="agent", role="agent")
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    denied = agent.post("/v1/memories/search", body, format="json")
    assert denied.status_code == 403
    assert denied.json()["missing_grant"] == f"user:{end_user.id}"
    created = agent.post("/v1/users", {}, format="json").json()["user_id"]
    mine = agent.post("/v1/memories/search", {**body, "user_id": created}, format="json")
    assert mine.status_code == 200 and mine.json()["results"] == []

    EndUser.objects.filter(pk=end_user.pk).update(erasing_since=timezone.now())
    assert api.post("/v1/memories/search", body, format="json").status_code == 404
    assert agent.post("/v1/memories/search", body, format="json").status_code == 404
