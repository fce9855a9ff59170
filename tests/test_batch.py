"""Bulk writes: one embedding call, one transaction, an answer per item."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from memories import accounts, ledger
from memories.batch import (
    COPY_COLUMNS_LEFT_OUT,
    HISTORY_COPY_COLUMNS,
    MEMORY_COPY_COLUMNS,
    memories_batch_apply,
)
from memories.models import Memory, MemoryHistory, MemoryRequest, OutboxEvent
from memories.providers.wiring import get_embedder
from tests.helpers import wait_for


def batch(api, items: list, headers: dict | None = None, **body):
    return api.post(
        "/v1/memories/batch", {"items": items, **body}, format="json", **(headers or {})
    )


@pytest.mark.django_db
def test_batch_creates_updates_and_deletes_with_per_item_results(api, end_user) -> None:
    uid = str(end_user.id)
    created = batch(
        api,
        [
            {"user_id": uid, "content": f"Fact {n}", "type": "preference", "metadata": {"n": n}}
            for n in range(3)
        ],
    ).json()
    assert created["ok"] == 3 and created["failed"] == 0
    ids = [r["id"] for r in created["results"]]

    response = batch(
        api,
        [
            {"action": "update", "id": ids[0], "user_id": uid, "content": "Fact zero, corrected"},
            {"action": "delete", "id": ids[1], "user_id": uid},
            {"action": "create", "user_id": uid, "content": ""},  # invalid: sinks only itself
            {"action": "create", "user_id": uid, "content": "Fact 3"},
        ],
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "ok", "error", "ok"]
    assert results[2]["error"]["field"] == "content" and results[2]["index"] == 2
    assert results[0]["version"] == 2

    live = sorted(
        Memory.objects.filter(user=end_user, deleted_at__isnull=True).values_list(
            "content", flat=True
        )
    )
    assert live == ["Fact 2", "Fact 3", "Fact zero, corrected"]
    assert Memory.objects.get(pk=ids[2]).metadata == {"n": 2}
    events = list(MemoryHistory.objects.filter(memory_id=ids[0]).values_list("event", flat=True))
    assert events == ["ADD", "UPDATE"]
    assert MemoryHistory.objects.get(memory_id=ids[1], event="DELETE").old_content == "Fact 1"


@pytest.mark.django_db
def test_a_batch_of_changes_costs_the_same_queries_for_two_memories_as_for_twenty(
    end_user,
) -> None:
    uid = str(end_user.id)

    def queries_to_change(count: int) -> int:
        created = memories_batch_apply(
            tenant=end_user.tenant,
            raw_items=[{"user_id": uid, "content": f"Fact {n} of {count}"} for n in range(count)],
            embedder=get_embedder(),
        )
        changes = [
            {"action": "delete", "id": r["id"], "user_id": uid}
            if n % 2
            else {"action": "update", "id": r["id"], "user_id": uid, "content": f"New {n}"}
            for n, r in enumerate(created)
        ]
        with CaptureQueriesContext(connection) as queries:
            results = memories_batch_apply(
                tenant=end_user.tenant, raw_items=changes, embedder=get_embedder()
            )
        assert all(r["status"] == "ok" for r in results)
        return len(queries)

    assert queries_to_change(2) == queries_to_change(20)
    live = Memory.objects.filter(user=end_user, deleted_at__isnull=True)
    assert sorted(live.values_list("content", flat=True))[:2] == ["New 0", "New 0"]
    assert live.count() == 11  # 1 of 2 and 10 of 20 updated, the others deleted
    updated = live.filter(content="New 2").get()
    expected = get_embedder().embed(["New 2"])[0]
    assert max(abs(a - b) for a, b in zip(updated.embedding, expected, strict=True)) < 1e-6


@pytest.mark.django_db
def test_a_batch_of_creates_costs_the_same_queries_for_two_memories_as_for_two_hundred(
    end_user,
) -> None:
    uid = str(end_user.id)

    def queries_to_create(count: int) -> int:
        items = [{"user_id": uid, "content": f"Fact {n} of {count}"} for n in range(count)]
        with CaptureQueriesContext(connection) as queries:
            results = memories_batch_apply(
                tenant=end_user.tenant, raw_items=items, embedder=get_embedder()
            )
        assert [r["status"] for r in results] == ["ok"] * count
        return len(queries)

    assert queries_to_create(2) == queries_to_create(200)
    assert Memory.objects.filter(user=end_user).count() == 202
    assert MemoryHistory.objects.filter(event="ADD").count() == 202
    assert OutboxEvent.objects.filter(event_type="memory.created").count() == 202


@pytest.mark.django_db
def test_batch_items_are_searchable_by_meaning(api, end_user) -> None:
    uid = str(end_user.id)
    batch(
        api,
        [
            {"user_id": uid, "content": text}
            for text in ("Has a cat named Tom", "Lives in Paris", "Works at Acme")
        ],
    )
    results = api.post(
        "/v1/memories/search", {"user_id": uid, "query": "cat named Tom"}, format="json"
    ).json()["results"]
    assert results[0]["content"] == "Has a cat named Tom"


@pytest.mark.django_db
def test_batch_embeds_all_items_in_one_call_and_records_an_event_each(
    openai_settings, api, end_user
) -> None:
    uid = str(end_user.id)
    response = batch(api, [{"user_id": uid, "content": f"Fact {n}"} for n in range(50)])
    assert response.json()["ok"] == 50
    embedding_calls = [r for r in openai_settings.requests if r.path.endswith("/embeddings")]
    assert len(embedding_calls) == 1 and len(embedding_calls[0].body["input"]) == 50
    assert OutboxEvent.objects.filter(event_type="memory.created").count() == 50


@pytest.mark.django_db
def test_batch_items_of_another_tenant_fail_alone(api, other_tenant, end_user) -> None:
    stranger = accounts.end_user_create(tenant=other_tenant, external_id="eve")
    theirs = batch_for(stranger, "Their secret")
    results = batch(
        api,
        [
            {"user_id": str(stranger.id), "content": "Injected"},
            {"action": "delete", "id": str(theirs.id), "user_id": str(end_user.id)},
            {
                "action": "update",
                "id": str(uuid.uuid4()),
                "user_id": str(end_user.id),
                "content": "x",
            },
            {"user_id": str(end_user.id), "content": "Mine"},
        ],
    ).json()["results"]
    assert [r["status"] for r in results] == ["error", "error", "error", "ok"]
    assert [r.get("error", {}).get("field") for r in results] == ["user_id", "id", "id", None]
    theirs.refresh_from_db()
    assert theirs.deleted_at is None
    assert not Memory.objects.filter(user=stranger, content="Injected").exists()


def batch_for(user, content: str) -> Memory:
    from memories.batch import memories_batch_apply
    from memories.providers.wiring import get_embedder

    (result,) = memories_batch_apply(
        tenant=user.tenant,
        embedder=get_embedder(),
        raw_items=[{"user_id": str(user.id), "content": content}],
    )
    return Memory.objects.get(pk=result["id"])


@pytest.mark.django_db
def test_batch_rows_read_back_as_written(api, end_user) -> None:
    # Creates travel in hand-encoded binary COPY (uuid, vector, jsonb): read them back through
    # the ORM and the events, as a client would.
    uid = str(end_user.id).upper()  # any spelling of a UUID names the same user
    metadata = {"city": "Zürich", "tags": ["a", "b"], "n": 2**70, "nested": {}}
    items = [
        {"user_id": uid, "content": "Lives in Zürich", "type": "preference", "metadata": metadata},
        {"user_id": uid, "content": "Likes tea", "agent_id": "bot", "session_id": "s-1"},
    ]
    results = batch(api, items).json()["results"]
    assert [r["status"] for r in results] == ["ok", "ok"]
    ids = [r["id"] for r in results]
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)

    first, second = (Memory.objects.get(pk=i) for i in ids)
    assert (first.user_id, first.tenant_id) == (end_user.id, end_user.tenant_id)
    assert first.metadata == metadata and first.type == "preference"
    assert first.vector_clock == {"batch": 1}  # no agent: the writer is the batch
    assert (second.agent_id, second.session_id, second.metadata) == ("bot", "s-1", {})
    assert second.vector_clock == {"bot": 1} and second.version == 1
    assert (second.written_by, second.merge_rule, second.state) == ("bot", "lww", {})
    expected = get_embedder().embed(["Lives in Zürich"])[0]
    assert len(first.embedding) == len(expected)
    assert all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
        for a, b in zip(first.embedding, expected, strict=True)
    )
    assert MemoryHistory.objects.get(memory_id=ids[0]).new_content == "Lives in Zürich"

    update = {"action": "update", "id": ids[1], "user_id": uid, "content": "Likes green tea"}
    assert batch(api, [update]).json()["results"][0]["version"] == 2
    second.refresh_from_db()
    expected = get_embedder().embed(["Likes green tea"])[0]
    assert all(
        math.isclose(a, b, abs_tol=1e-7) for a, b in zip(second.embedding, expected, strict=True)
    )

    payloads = [e.payload for e in OutboxEvent.objects.filter(event_type="memory.created")]
    assert sorted(p["memory"]["id"] for p in payloads) == sorted(ids)
    assert len({p["event_id"] for p in payloads}) == 2
    assert all(uuid.UUID(p["event_id"]).version == 4 for p in payloads)
    assert {p["source"]["user_id"] for p in payloads} == {str(end_user.id)}
    # An integer beyond 64 bits survives in the row and in its event.
    assert [p["memory"]["metadata"] for p in payloads if p["memory"]["id"] == ids[0]] == [metadata]


def test_new_uuid4s_are_random_version_4_uuids() -> None:
    from memories.batch import new_uuid4s

    drawn = new_uuid4s(500)
    for raw, text in drawn:
        parsed = uuid.UUID(text)
        assert parsed.bytes == raw and str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert len({text for _, text in drawn}) == 500
    assert new_uuid4s(0) == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": []}, "items"),
        ({"items": "nope"}, "items"),
        ({}, "items"),
        ({"items": [{}], "async": "yes"}, "async"),
    ],
)
def test_bad_batch_body_is_400_naming_the_field(api, body, field) -> None:
    response = api.post("/v1/memories/batch", body, format="json")
    assert response.status_code == 400 and field in response.json()["fields"]


@pytest.mark.django_db
def test_batch_over_the_limit_is_400_and_writes_nothing(settings, api, end_user) -> None:
    settings.BATCH_MAX_ITEMS = 5
    response = batch(api, [{"user_id": str(end_user.id), "content": f"F{n}"} for n in range(6)])
    assert response.status_code == 400 and "items" in response.json()["fields"]
    assert not Memory.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_async_batch_runs_in_the_batch_lane_exactly_once(api, end_user, start_worker) -> None:
    start_worker(queues="batch")
    items = [{"user_id": str(end_user.id), "content": f"Bulk fact {n}"} for n in range(120)]
    accepted = batch(api, items, {"HTTP_IDEMPOTENCY_KEY": "bulk-1"}, **{"async": True})
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    again = batch(api, items, {"HTTP_IDEMPOTENCY_KEY": "bulk-1"}, **{"async": True})
    assert again.status_code == 409 and again.json()["request_id"] == request_id

    deadline = time.monotonic() + 30
    while MemoryRequest.objects.get(pk=request_id).status != "success":
        assert time.monotonic() < deadline, "batch did not finish"
        time.sleep(0.1)
    status = api.get(f"/v1/requests/{request_id}").json()
    assert len(status["events"]) == 120 and {e["status"] for e in status["events"]} == {"ok"}
    assert Memory.objects.filter(user=end_user).count() == 120


@pytest.mark.django_db(transaction=True)
def test_events_of_a_large_batch_are_published_by_the_batch_lane(api, end_user, start_worker):
    from memories.events.stream import STREAM_KEY, redis_client

    start_worker(queues="batch")
    items = [{"user_id": str(end_user.id), "content": f"Fact {n}"} for n in range(150)]
    assert batch(api, items).json()["ok"] == 150

    def published() -> int:
        entries = redis_client().xrange(STREAM_KEY)
        return sum(f["tenant_id"] == str(end_user.tenant_id) for _, f in entries)

    deadline = time.monotonic() + 20
    while published() < 150:
        assert time.monotonic() < deadline, f"only {published()} of 150 events published"
        time.sleep(0.1)
    assert published() == 150
    # Marked published by the lane a moment after it published them.
    wait_for(
        lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists(),
        timeout=10,
        what="the outbox rows marked published",
    )


@pytest.mark.django_db
def test_a_batch_item_with_a_null_character_fails_alone(api, end_user) -> None:
    uid = str(end_user.id)
    items = [
        {"user_id": uid, "content": "Likes tea"},
        {"user_id": uid, "content": "Likes a\x00b"},
        {"user_id": uid, "content": "Likes coffee", "metadata": {"note": "x\x00"}},
        {"user_id": uid, "content": "Likes jam", "agent_id": "agent\x00"},
    ]
    results = batch(api, items).json()["results"]
    assert [r["status"] for r in results] == ["ok", "error", "error", "error"]
    assert [r["error"]["field"] for r in results[1:]] == ["content", "metadata", "agent_id"]
    assert list(Memory.objects.values_list("content", flat=True)) == ["Likes tea"]


@pytest.mark.django_db
def test_an_async_batch_with_a_null_character_is_400_and_records_nothing(api, end_user) -> None:
    items = [
        {"user_id": str(end_user.id), "content": "Likes tea"},
        {"user_id": str(end_user.id), "content": "Likes jam", "metadata": {"k": "\x00"}},
    ]
    response = batch(api, items, **{"async": True})
    assert response.status_code == 400, response.content
    assert response.json()["fields"] == {"items": ["Item 1: Null characters are not allowed."]}
    assert not MemoryRequest.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("bad_item", "field"),
    [
        ({"content": "Likes x", "type": ["fact"]}, "type"),
        ({"content": "Likes x", "type": {"k": "v"}}, "type"),
        ({"content": "Likes x", "type": 7}, "type"),
        ({"content": "Likes x", "id": ["a"]}, "id"),
        ({"content": "Likes x", "id": str(uuid.uuid4())}, "id"),
        ({"content": "Likes x", "metadata": ["a"]}, "metadata"),
        ({"action": ["create"], "content": "Likes x"}, "action"),
        ({"action": "update", "id": {"a": 1}, "content": "Likes x"}, "id"),
    ],
)
def test_a_batch_item_of_the_wrong_shape_fails_alone(api, end_user, bad_item, field) -> None:
    uid = str(end_user.id)
    response = batch(
        api,
        [{"user_id": uid, "content": "Likes tea"}, {"user_id": uid, **bad_item}],
    )
    assert response.status_code == 200, response.content
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "error"]
    assert results[1]["error"]["field"] == field
    assert list(Memory.objects.values_list("content", flat=True)) == ["Likes tea"]


@pytest.mark.django_db
def test_a_batch_update_keeps_the_type_and_metadata_it_leaves_out(api, end_user) -> None:
    uid = str(end_user.id)
    created = batch(
        api,
        [
            {
                "user_id": uid,
                "content": f"Likes tea {n}",
                "type": "preference",
                "metadata": {"n": n},
            }
            for n in range(2)
        ],
    ).json()["results"]
    response = batch(
        api,
        [
            {"action": "update", "id": created[0]["id"], "user_id": uid, "content": "Likes jam"},
            {
                "action": "update",
                "id": created[1]["id"],
                "user_id": uid,
                "content": "Likes honey",
                "type": None,
                "metadata": {"n": 10},
            },
        ],
    )
    assert [r["status"] for r in response.json()["results"]] == ["ok", "ok"]
    first, second = (Memory.objects.get(pk=r["id"]) for r in created)
    assert (first.content, first.type, first.metadata) == ("Likes jam", "preference", {"n": 0})
    assert (second.content, second.type, second.metadata) == (
        "Likes honey",
        "preference",
        {"n": 10},
    )


@pytest.mark.django_db
@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_a_batch_with_a_number_no_column_can_hold_is_400_and_writes_nothing(
    api, end_user, run_async
) -> None:
    items = [
        {"user_id": str(end_user.id), "content": "Likes tea"},
        {"user_id": str(end_user.id), "content": "Likes jam", "metadata": {"n": "HUGE"}},
    ]
    body = json.dumps({"async": run_async, "items": items}).replace('"HUGE"', "-1e999")
    response = api.post("/v1/memories/batch", data=body, content_type="application/json")
    assert response.status_code == 400 and "body" in response.json()["fields"]
    assert not Memory.objects.exists() and not MemoryRequest.objects.exists()


@pytest.fixture
def second_chunk_fails(monkeypatch):
    """Make the second chunk a batch writes fail (its history COPY raises, as if the database
    went away mid-batch); returns a function that heals the database again."""
    from memories import batch as batch_module

    copy_history, calls = batch_module._copy_history, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("database went away")
        return copy_history(*args, **kwargs)

    def arm():
        monkeypatch.setattr(batch_module, "_copy_history", failing)
        return lambda: monkeypatch.setattr(batch_module, "_copy_history", copy_history)

    return arm


@pytest.mark.django_db(transaction=True)
def test_an_async_batch_is_applied_in_chunks_and_resumes_after_the_last_one_committed(
    settings, api, end_user, second_chunk_fails
) -> None:
    from memories.batch import batch_request_run

    settings.BATCH_MAX_ITEMS = 50
    uid = str(end_user.id)
    items = [{"user_id": uid, "content": f"Bulk fact {n}"} for n in range(120)]
    items[60] = {"user_id": uid, "content": ""}  # a bad item keeps its own place in the results
    accepted = batch(api, items, **{"async": True})
    request_id = accepted.json()["request_id"]

    second_chunk_fails()
    assert batch_request_run(request_id=request_id) == "retry"
    # The first chunk committed with its progress; the second rolled back whole.
    assert Memory.objects.filter(user=end_user).count() == 50
    assert len(MemoryRequest.objects.get(pk=request_id).result) == 50

    assert batch_request_run(request_id=request_id) == "done"
    stored = Memory.objects.filter(user=end_user).values_list("content", flat=True)
    assert sorted(stored) == sorted(item["content"] for item in items if item["content"])
    results = api.get(f"/v1/requests/{request_id}").json()["events"]
    assert [r["index"] for r in results] == list(range(120))
    assert [r["status"] for r in results].count("error") == 1 and results[60]["status"] == "error"
    assert MemoryRequest.objects.get(pk=request_id).attempts == 2


@pytest.mark.django_db
def test_an_async_batch_of_the_largest_size_with_realistic_items_is_accepted(
    settings, api, end_user
) -> None:
    uid = str(end_user.id)
    note = "Prefers window seats on long flights and asks for vegetarian meals. " * 3
    items = [
        {"user_id": uid, "content": f"{n}: {note}", "type": "preference", "metadata": {"n": n}}
        for n in range(settings.BATCH_ASYNC_MAX_ITEMS)
    ]
    body = json.dumps({"items": items, "async": True})
    assert len(body) > 2_000_000  # ~250 bytes an item
    response = api.post("/v1/memories/batch", data=body, content_type="application/json")
    assert response.status_code == 202, response.content[:300]
    recorded = MemoryRequest.objects.get(pk=response.json()["request_id"])
    assert len(recorded.payload["items"]) == settings.BATCH_ASYNC_MAX_ITEMS


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_fails_part_way_keeps_its_duplicates_out_and_says_what_it_applied(
    settings, api, end_user, second_chunk_fails
) -> None:
    from memories.batch import batch_request_run

    settings.BATCH_MAX_ITEMS = 50
    settings.MEMORY_JOB_MAX_ATTEMPTS = 1
    items = [{"user_id": str(end_user.id), "content": f"Bulk fact {n}"} for n in range(120)]
    key = {"HTTP_IDEMPOTENCY_KEY": "nightly-import"}
    request_id = batch(api, items, key, **{"async": True}).json()["request_id"]
    heal = second_chunk_fails()
    assert batch_request_run(request_id=request_id) == "failed"
    failed = api.get(f"/v1/requests/{request_id}").json()
    assert failed["status"] == "failure" and "50 of 120 items applied" in failed["error"]
    # Sent again, its first 50 items would be written twice: its key is still taken.
    again = batch(api, items, key, **{"async": True})
    assert again.status_code == 409 and again.json()["request_id"] == request_id
    assert Memory.objects.filter(user=end_user).count() == 50

    # The admin's retry applies the rest, each item once.
    heal()
    ledger.memory_request_retry(memory_request=MemoryRequest.objects.get(pk=request_id))
    assert batch_request_run(request_id=request_id) == "done"
    stored = Memory.objects.filter(user=end_user).values_list("content", flat=True)
    assert sorted(stored) == sorted(item["content"] for item in items)
    assert len(api.get(f"/v1/requests/{request_id}").json()["events"]) == 120


@pytest.mark.django_db(transaction=True)
def test_the_same_memory_twice_in_one_async_batch_is_refused_across_chunks(
    settings, api, end_user
) -> None:
    from memories.batch import batch_request_run

    settings.BATCH_MAX_ITEMS = 50
    uid = str(end_user.id)
    memory_id = batch(api, [{"user_id": uid, "content": "Likes tea"}]).json()["results"][0]["id"]
    items = [{"user_id": uid, "content": f"Bulk fact {n}"} for n in range(100)]
    items[10] = {"action": "update", "id": memory_id, "user_id": uid, "content": "Likes jam"}
    items[70] = {"action": "update", "id": memory_id, "user_id": uid, "content": "Likes honey"}
    request_id = batch(api, items, **{"async": True}).json()["request_id"]
    assert batch_request_run(request_id=request_id) == "done"
    results = api.get(f"/v1/requests/{request_id}").json()["events"]
    assert results[10]["status"] == "ok"
    assert results[70]["status"] == "error" and results[70]["error"]["field"] == "id"
    assert Memory.objects.get(pk=memory_id).content == "Likes jam"


@pytest.mark.django_db
def test_an_async_batch_takes_metadata_as_deep_as_a_synchronous_one(api, end_user) -> None:
    from memories.validation import MAX_JSON_DEPTH

    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # the deepest allowed
    item = {"user_id": str(end_user.id), "content": "Likes tea", "metadata": {"k": "NESTED"}}
    for run_async in (False, True):
        body = json.dumps({"items": [item], "async": run_async}).replace('"NESTED"', nested)
        response = api.post("/v1/memories/batch", data=body, content_type="application/json")
        assert response.status_code in (200, 202), response.content
        if not run_async:
            assert response.json()["results"][0]["status"] == "ok"


@pytest.mark.django_db
def test_a_batch_whose_embedding_provider_fails_is_502_and_writes_nothing(
    api, end_user, openai_settings, settings
) -> None:
    settings.LLM_CLIENT_MAX_RETRIES = 0  # the openai client would retry the 503 itself
    openai_settings.fail_next(1, status=503)
    response = batch(api, [{"user_id": str(end_user.id), "content": "Likes tea"}])
    assert response.status_code == 502 and response.json()["error"] == "provider_unavailable"
    assert int(response["Retry-After"]) > 0
    assert not Memory.objects.exists() and not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_batch_chunk_whose_claim_was_taken_over_commits_nothing(settings, api, end_user) -> None:
    from memories.batch import batch_request_work

    settings.BATCH_MAX_ITEMS = 50
    items = [{"user_id": str(end_user.id), "content": f"Bulk fact {n}"} for n in range(120)]
    request_id = batch(api, items, **{"async": True}).json()["request_id"]
    claim = ledger.memory_request_claim(request_id=request_id)
    # Another worker takes the request over (its lease ran out): this claim's token is stale.
    MemoryRequest.objects.filter(pk=request_id).update(attempts=claim.token + 1)
    with pytest.raises(ledger.LeaseLost):
        batch_request_work(claim, claim.request)
    assert not Memory.objects.exists()
    assert MemoryRequest.objects.get(pk=request_id).result == []


@pytest.mark.parametrize(
    ("model", "copied"),
    [(Memory, MEMORY_COPY_COLUMNS), (MemoryHistory, HISTORY_COPY_COLUMNS)],
    ids=["memory", "history"],
)
def test_bulk_writes_copy_every_column_of_the_model_or_say_why_not(model, copied) -> None:
    # A field added to the model and forgotten here would be left NULL (or at its default) by
    # every bulk write while the other write paths set it.
    columns = {field.column for field in model._meta.concrete_fields}
    left_out = COPY_COLUMNS_LEFT_OUT[model]
    assert set(copied) | set(left_out) == columns
    assert not set(copied) & set(left_out)
