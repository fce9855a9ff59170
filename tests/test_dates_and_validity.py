"""Dates and current truth: every write path takes a time (`timestamp` per message, `occurred_at`
per item or correction), filters and keyword search use it, and a contradicted memory is closed
(`valid_to`), not erased: out of list, search and sync's live set, still readable by id, in its
history with the reason, and by `as_of`."""

from __future__ import annotations

from datetime import datetime

import pytest

from memories.models import EndUser, Memory, MemoryRequest, OutboxEvent
from memories.pipeline import memory_request_run
from tests.test_events import sync

pytestmark = pytest.mark.django_db


def post_job(api, user: EndUser, *texts: str, timestamp: str | None = None) -> MemoryRequest:
    """A job through the API, run in-process; its request, finished."""
    messages = [
        {"role": "user", "content": text, **({"timestamp": timestamp} if timestamp else {})}
        for text in texts
    ]
    response = api.post(
        "/v1/memories", {"user_id": str(user.id), "messages": messages}, format="json"
    )
    assert response.status_code == 202, response.json()
    request_id = response.json()["request_id"]
    assert memory_request_run(request_id=request_id) == "done"
    return MemoryRequest.objects.get(pk=request_id)


def batch_create(api, user: EndUser, *items: tuple[str, str]) -> list[str]:
    body = {
        "items": [
            {"user_id": str(user.id), "content": content, "occurred_at": occurred_at}
            for content, occurred_at in items
        ]
    }
    response = api.post("/v1/memories/batch", body, format="json")
    assert response.status_code == 200 and response.json()["failed"] == 0, response.json()
    return [result["id"] for result in response.json()["results"]]


def search(api, user: EndUser, query: str, **options) -> list[dict]:
    body = {"user_id": str(user.id), "query": query, **options}
    response = api.post("/v1/memories/search", body, format="json")
    assert response.status_code == 200, response.json()
    return response.json()["results"]


def listed(api, user: EndUser, **params) -> list[str]:
    response = api.get("/v1/memories", {"user_id": str(user.id), **params})
    assert response.status_code == 200, response.json()
    return [memory["content"] for memory in response.json()["results"]]


# --- Dates on every write path --------------------------------------------------------------------


def test_a_jobs_memories_are_dated_by_its_latest_message_and_the_timestamp_enters_the_hash(
    api, end_user
) -> None:
    request = post_job(api, end_user, "I live in Paris.", timestamp="2025-05-14T09:30:00Z")
    (memory,) = Memory.objects.filter(user=end_user)
    assert memory.occurred_at == datetime.fromisoformat("2025-05-14T09:30:00+00:00")
    assert request.result[0]["occurred_at"] == "2025-05-14T09:30:00+00:00"
    shown = api.get(f"/v1/memories/{memory.id}").json()
    assert shown["occurred_at"] == "2025-05-14T09:30:00Z" and shown["valid_to"] is None
    # The same words said at another time are another job, not a duplicate (409).
    body = {
        "user_id": str(end_user.id),
        "messages": [
            {"role": "user", "content": "I live in Paris.", "timestamp": "2025-06-01T00:00:00Z"}
        ],
    }
    assert api.post("/v1/memories", body, format="json").status_code == 202


def test_without_a_timestamp_a_memory_is_dated_when_its_job_was_accepted(api, end_user) -> None:
    request = post_job(api, end_user, "I like tea.")
    (memory,) = Memory.objects.filter(user=end_user)
    assert memory.occurred_at == request.created_at


def test_a_bad_timestamp_is_a_400_naming_the_message_field(api, end_user) -> None:
    body = {
        "user_id": str(end_user.id),
        "messages": [{"role": "user", "content": "I like tea.", "timestamp": "last tuesday"}],
    }
    response = api.post("/v1/memories", body, format="json")
    assert response.status_code == 400 and "messages" in response.json()["fields"]
    assert not MemoryRequest.objects.exists()


def test_batch_items_and_corrections_take_occurred_at(api, end_user) -> None:
    (memory_id,) = batch_create(api, end_user, ("Ran the Lisbon half marathon", "2025-03-09"))
    memory = Memory.objects.get(pk=memory_id)
    assert memory.occurred_at == datetime.fromisoformat("2025-03-09T00:00:00+00:00")
    assert memory.history.get().occurred_at == memory.occurred_at
    bad = {"items": [{"user_id": str(end_user.id), "content": "x", "occurred_at": "2025-02-30"}]}
    (result,) = api.post("/v1/memories/batch", bad, format="json").json()["results"]
    assert result["status"] == "error" and result["error"]["field"] == "occurred_at"
    response = api.patch(
        f"/v1/memories/{memory_id}", {"occurred_at": "2025-03-10T08:00:00Z"}, format="json"
    )
    assert response.status_code == 200 and response.json()["occurred_at"] == "2025-03-10T08:00:00Z"


# --- Dates in keyword search and filters ---------------------------------------------------------


def test_keyword_search_finds_a_memory_by_the_month_and_year_it_happened(api, end_user) -> None:
    batch_create(
        api,
        end_user,
        ("Went to a pottery class", "2025-02-11"),
        ("Adopted a beagle named Toby", "2025-05-20"),
        ("Started learning the cello", "2025-09-02"),
    )
    (first, *_) = search(api, end_user, "What did she do in May 2025?", mode="keyword")
    assert first["content"] == "Adopted a beagle named Toby"
    (first, *_) = search(api, end_user, "what happened on a Tuesday?", mode="keyword")
    assert first["content"] in ("Went to a pottery class", "Started learning the cello")


def test_filters_are_applied_in_sql_before_the_limit(api, end_user) -> None:
    batch_create(api, end_user, *[(f"Likes tea number {n}", "2025-01-01") for n in range(30)])
    batch_create(api, end_user, ("Likes tea from Kyoto", "2025-07-04"))
    window = {"occurred_at": {"gte": "2025-07-01", "lt": "2025-08-01"}}
    for mode in ("hybrid", "vector", "keyword"):
        results = search(api, end_user, "tea", limit=1, mode=mode, filters=window)
        assert [r["content"] for r in results] == ["Likes tea from Kyoto"], mode
    assert listed(api, end_user, occurred_at='{"gte": "2025-07-01"}') == ["Likes tea from Kyoto"]
    assert listed(api, end_user, occurred_at='{"lt": "2024-01-01"}') == []


def test_metadata_operators_filter_search_and_list(api, end_user) -> None:
    items = [
        ("Fix the roof", {"priority": 3, "tag": "home"}),
        ("Call the bank", {"priority": 1, "tag": "money"}),
        ("Buy a tent", {"priority": 2, "tag": "trip", "archived": True}),
        ("Book the ferry", {"priority": "high", "tag": "trip"}),
    ]
    body = {
        "items": [
            {"user_id": str(end_user.id), "content": content, "metadata": metadata}
            for content, metadata in items
        ]
    }
    assert api.post("/v1/memories/batch", body, format="json").status_code == 200

    def found(metadata: dict) -> list[str]:
        results = search(api, end_user, "roof bank tent ferry", filters={"metadata": metadata})
        return sorted(r["content"] for r in results)

    # A number compares with numbers only: "high" is not >= 2.
    assert found({"priority": {"gte": 2}}) == ["Buy a tent", "Fix the roof"]
    assert found({"tag": {"in": ["home", "money"]}}) == ["Call the bank", "Fix the roof"]
    assert found({"archived": {"exists": False}, "tag": "trip"}) == ["Book the ferry"]
    assert found({"tag": {"ne": "trip"}}) == ["Call the bank", "Fix the roof"]
    assert found({"tag": {"nin": ["trip", "home"]}, "priority": {"lt": 5}}) == ["Call the bank"]
    assert listed(api, end_user, metadata='{"priority": {"gt": 2}}') == ["Fix the roof"]


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"colour": "red"}, "filters.colour"),
        ({"scope": "everyone"}, "filters.scope"),
        ({"occurred_at": "2025-01-01"}, "filters.occurred_at"),
        ({"occurred_at": {"after": "2025-01-01"}}, "filters.occurred_at"),
        ({"created_at": {"gte": "yesterday"}}, "filters.created_at.gte"),
        ({"metadata": {"priority": {"gte": [1]}}}, "filters.metadata.priority"),
        ({"metadata": {"tag": {"in": []}}}, "filters.metadata.tag"),
        ({"metadata": {"archived": {"exists": "no"}}}, "filters.metadata.archived"),
        ({"metadata": ["a"]}, "filters.metadata"),
        ("type=fact", "filters"),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(api, end_user, filters, field) -> None:
    body = {"user_id": str(end_user.id), "query": "tea", "filters": filters}
    response = api.post("/v1/memories/search", body, format="json")
    assert response.status_code == 400 and field in response.json()["fields"], response.json()


def test_bad_list_filters_and_as_of_are_400s_naming_the_parameter(api, end_user) -> None:
    for params, field in [
        ({"occurred_at": "{bad json"}, "occurred_at"),
        ({"updated_at": '{"gte": "soon"}'}, "updated_at.gte"),
        ({"type": "secret"}, "type"),
        ({"as_of": "the day before"}, "as_of"),
    ]:
        response = api.get("/v1/memories", {"user_id": str(end_user.id), **params})
        assert response.status_code == 400 and field in response.json()["fields"], params


def test_scope_and_type_filters(api, end_user) -> None:
    body = {
        "items": [
            {"user_id": str(end_user.id), "content": "Prefers tea", "type": "preference"},
            {"user_id": str(end_user.id), "content": "Drinks tea daily", "type": "fact"},
        ]
    }
    assert api.post("/v1/memories/batch", body, format="json").status_code == 200
    assert [r["content"] for r in search(api, end_user, "tea", filters={"type": "preference"})] == [
        "Prefers tea"
    ]
    assert search(api, end_user, "tea", filters={"scope": "tenant"}) == []


def test_recency_weighting_lets_a_recent_match_pass_an_older_better_one(api, end_user) -> None:
    batch_create(
        api,
        end_user,
        ("Visited Lisbon", "2021-03-01"),
        ("Visited Lisbon and Porto with friends", "2026-11-01"),
    )
    plain = search(api, end_user, "Visited Lisbon", mode="keyword")
    recent = search(api, end_user, "Visited Lisbon", mode="keyword", recency_half_life_days=365)
    assert [r["content"] for r in plain][0] == "Visited Lisbon"
    assert [r["content"] for r in recent][0] == "Visited Lisbon and Porto with friends"
    bad = {"user_id": str(end_user.id), "query": "x", "recency_half_life_days": 0}
    response = api.post("/v1/memories/search", bad, format="json")
    assert response.status_code == 400 and "recency_half_life_days" in response.json()["fields"]


# --- Close, don't erase -------------------------------------------------------------------------


# Committed for real: pull-sync hands on only what every running transaction can see.
@pytest.mark.django_db(transaction=True)
def test_a_contradicted_memory_is_closed_not_erased(api, end_user) -> None:
    post_job(api, end_user, "I eat meat. I like hiking.", timestamp="2025-01-10T12:00:00Z")
    meat = Memory.objects.get(user=end_user, content="Eats meat")
    post_job(api, end_user, "I no longer eat meat.", timestamp="2025-06-01T12:00:00Z")

    assert listed(api, end_user) == ["Likes hiking"]
    assert "Eats meat" not in [r["content"] for r in search(api, end_user, "meat")]
    shown = api.get(f"/v1/memories/{meat.id}")
    assert shown.status_code == 200
    assert (shown.json()["content"], shown.json()["valid_to"]) == (
        "Eats meat",
        "2025-06-01T12:00:00Z",
    )
    history = api.get(f"/v1/memories/{meat.id}/history").json()["history"]
    assert [(h["event"], h["valid_from"], h["valid_to"]) for h in history] == [
        ("ADD", "2025-01-10T12:00:00Z", "2025-06-01T12:00:00Z"),
        ("CLOSE", "2025-06-01T12:00:00Z", None),
    ]
    assert (history[1]["old_content"], history[1]["reason"]) == ("Eats meat", "No longer eats meat")

    # Expect both memories: a change shows once every transaction begun before it has ended.
    changes = sync(api, end_user, expect=2)["changes"]
    (change,) = [c for c in changes if c["id"] == str(meat.id)]
    assert change["closed"] is True and change["deleted"] is False
    (event,) = OutboxEvent.objects.filter(event_type="memory.closed")  # published on commit
    assert event.payload["memory"]["id"] == str(meat.id)
    assert event.payload["memory"]["valid_to"] == "2025-06-01T12:00:00+00:00"


def test_as_of_returns_what_was_true_then(api, end_user) -> None:
    post_job(api, end_user, "I live in Paris. I eat meat.", timestamp="2025-01-10T12:00:00Z")
    post_job(api, end_user, "I moved to Berlin.", timestamp="2025-04-01T12:00:00Z")
    post_job(api, end_user, "I no longer eat meat.", timestamp="2025-06-01T12:00:00Z")
    home = Memory.objects.get(user=end_user, content="Lives in Berlin")

    assert listed(api, end_user) == ["Lives in Berlin"]
    assert sorted(listed(api, end_user, as_of="2025-02-01")) == ["Eats meat", "Lives in Paris"]
    assert sorted(listed(api, end_user, as_of="2025-05-01")) == ["Eats meat", "Lives in Berlin"]
    assert listed(api, end_user, as_of="2024-12-31") == []
    then = search(api, end_user, "Where does she live? Paris?", as_of="2025-02-01T00:00:00Z")
    assert then[0]["content"] == "Lives in Paris" and then[0]["id"] == str(home.id)
    for mode in ("vector", "keyword"):
        then = search(api, end_user, "meat", mode=mode, as_of="2025-05-01T00:00:00Z")
        assert "Eats meat" in [r["content"] for r in then], mode
