"""Every change is an event: outbox, stream, channels, sessions, replay, pull-sync."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from memories import erasure, ledger, memory_writes, search, selectors
from memories.events import publisher
from memories.events.publisher import relay_unpublished
from memories.events.stream import STREAM_KEY, redis_client
from memories.models import Memory, MemoryRequest, OutboxEvent
from memories.pipeline import memory_request_run
from memories.providers.wiring import get_embedder
from tests.helpers import store_memories, submit_job, wait_for


def tenant_events(tenant, event_type: str | None = None) -> list[dict]:
    entries = redis_client().xrange(STREAM_KEY)
    events = [
        json.loads(f["event"]) | {"id": i} for i, f in entries if f["tenant_id"] == str(tenant.id)
    ]
    return [e for e in events if event_type is None or e["event_type"] == event_type]


def new_memory(user, text: str = "Lives in Paris") -> Memory:
    return store_memories(user, text)[0]


@pytest.mark.django_db(transaction=True)
def test_committed_change_is_published_to_stream_and_user_channel(end_user) -> None:
    pubsub = redis_client().pubsub()
    pubsub.subscribe(f"user:{end_user.id}:memories")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    memory = new_memory(end_user)

    (event,) = tenant_events(end_user.tenant, "memory.created")
    assert event["schema"] == 1 and event["event_id"] and event["timestamp"]
    # The memory as the API shows it, so that a client's cache may keep it as it comes.
    assert event["memory"] == {
        "id": str(memory.id),
        "user_id": str(end_user.id),
        "content": "Lives in Paris",
        "type": "fact",
        "scope": "user",
        "topic": "",
        "metadata": {},
        "agent_id": "",
        "session_id": "",
        "version": 1,
        "clock": {},
        "merge": "lww",
        "conflicted": False,
        "written_at": memory.written_at.isoformat(),
        "created_at": memory.created_at.isoformat(),
        "updated_at": memory.updated_at.isoformat(),
        "occurred_at": memory.occurred_at.isoformat(),
        "valid_to": None,
    }
    assert event["source"] == {
        "agent_id": "",
        "session_id": "",
        "user_id": str(end_user.id),
        "tenant_id": str(end_user.tenant_id),
        "api_key_id": "",
    }
    assert event["channels"] == [f"user:{end_user.id}:memories"]
    message = pubsub.get_message(timeout=2)
    assert json.loads(message["data"])["id"] == event["id"]
    # Marked by the process's background marker, a moment after the publish.
    wait_for(lambda: OutboxEvent.objects.get().published_at is not None, timeout=5, what="mark")
    assert OutboxEvent.objects.get().stream_id == event["id"]
    pubsub.close()


@pytest.mark.django_db(transaction=True)
def test_events_are_published_after_redis_forgets_its_scripts(end_user) -> None:
    new_memory(end_user, "Lives in Paris")
    redis_client().script_flush()  # as after a Redis restart
    new_memory(end_user, "Likes tea")
    published = [e["memory"]["content"] for e in tenant_events(end_user.tenant, "memory.created")]
    assert published == ["Lives in Paris", "Likes tea"]


@pytest.mark.django_db(transaction=True)
def test_event_whose_row_could_not_be_marked_is_sent_again_by_the_relay(
    settings, monkeypatch, end_user
) -> None:
    attempts = []

    def failing_mark(ids, stream_ids) -> None:
        attempts.append(ids)
        raise DatabaseError("the database went away")

    monkeypatch.setattr(publisher, "_mark_published", failing_mark)
    new_memory(end_user)
    wait_for(lambda: attempts, timeout=5, what="the marker's attempt")
    monkeypatch.undo()
    (row,) = OutboxEvent.objects.all()
    assert row.published_at is None  # published to Redis, but not known to be
    settings.EVENT_RELAY_GRACE_SECONDS = 0
    assert relay_unpublished() == 1
    row.refresh_from_db()
    assert row.published_at is not None
    # At-least-once: the relay sent it again, under the same event_id.
    sent = tenant_events(end_user.tenant, "memory.created")
    assert len(sent) == 2 and sent[0]["event_id"] == sent[1]["event_id"]


@pytest.mark.django_db
def test_an_outbox_payload_reads_back_as_it_was_written() -> None:
    # Stored as json text: strings that look like numbers stay strings, key order stays.
    payload = {"z": "123", "a": ["1", 2, None], "nested": {"s": "true"}}
    row = OutboxEvent.objects.create(event_type="memory.created", payload=payload)
    assert OutboxEvent.objects.get(pk=row.pk).payload == payload
    assert OutboxEvent.objects.values_list("payload", flat=True).get(pk=row.pk) == payload
    assert OutboxEvent.objects.values_list("payload__z", flat=True).get(pk=row.pk) == "123"


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_publishes_nothing(end_user) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        new_memory(end_user)
        raise RuntimeError("abort")
    assert tenant_events(end_user.tenant) == []
    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_event_lost_to_a_redis_outage_is_relayed_later(settings, end_user) -> None:
    working_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there: publishing fails
    new_memory(end_user)  # the change commits all the same
    settings.REDIS_URL = working_url
    assert Memory.objects.count() == 1 and tenant_events(end_user.tenant) == []
    assert relay_unpublished() == 0  # too young: its own process may still be publishing it
    settings.EVENT_RELAY_GRACE_SECONDS = 0
    assert relay_unpublished() == 1
    assert [e["event_type"] for e in tenant_events(end_user.tenant)] == ["memory.created"]
    assert relay_unpublished() == 0  # published once, never twice


@pytest.mark.django_db(transaction=True)
def test_update_delete_search_and_clear_emit_their_events(end_user) -> None:
    memory = new_memory(end_user)
    memory_writes.memory_update(
        tenant_id=memory.tenant_id,
        memory_id=memory.id,
        embedder=get_embedder(),
        content="Lives in Rome",
    )
    updated = tenant_events(end_user.tenant)
    assert [e["event_type"] for e in updated] == ["memory.created", "memory.updated"]
    assert updated[1]["memory"]["content"] == "Lives in Rome"
    erasure.memory_forget(tenant_id=memory.tenant_id, memory_id=memory.id)
    search.memory_search(
        user=end_user, query="Rome", limit=5, filters={}, threshold=None, embedder=get_embedder()
    )
    events = tenant_events(end_user.tenant)
    # Forgetting took the memory's earlier events, which held its words, out of the stream.
    assert [e["event_type"] for e in events] == ["memory.deleted", "search.performed"]
    assert events[0]["memory"]["content"] is None and events[0]["memory"]["metadata"] == {}
    erasure.user_erasure_run(request_id=str(erasure.user_erasure_submit(user=end_user).id))
    # Erasing the user took all of theirs; what stays says only that it happened.
    [cleared] = tenant_events(end_user.tenant)
    assert cleared["event_type"] == "memory.cleared" and cleared["data"]["count"] == 1


@pytest.mark.django_db(transaction=True)
def test_failed_job_emits_error_occurred(settings, end_user) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 1
    request = ledger.memory_request_submit(
        tenant_id=end_user.tenant_id,
        user_id=end_user.id,
        payload={"messages": [{"role": "user", "content": "x"}], "infer": True},
    )
    MemoryRequest.objects.filter(pk=request.pk).update(attempts=1)
    assert memory_request_run(request_id=str(request.id)) == "skipped"
    (event,) = tenant_events(end_user.tenant, "error.occurred")
    assert event["data"]["request_id"] == str(request.id) and "Gave up" in event["data"]["error"]


# --- Sessions, timelines, replay -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_session_lifecycle_timeline_and_reconstruction(api, end_user) -> None:
    session_id = api.post(
        "/v1/sessions", {"user_id": str(end_user.id), "agent_id": "support"}, format="json"
    ).json()["session_id"]
    messages = [
        {"role": "user", "content": "I live in Paris."},
        {"role": "assistant", "content": "Noted!"},
    ]
    response = api.post(
        f"/v1/sessions/{session_id}/messages", {"messages": messages}, format="json"
    )
    assert response.status_code == 201
    api.post(
        "/v1/memories/search",
        {"user_id": str(end_user.id), "query": "Paris", "filters": {"session_id": session_id}},
        format="json",
    )
    ended = api.post(f"/v1/sessions/{session_id}/end", {"summarize": True}, format="json").json()
    assert ended["summary"] == "Lives in Paris" and ended["ended_at"]

    timeline = api.get(f"/v1/sessions/{session_id}/timeline").json()["timeline"]
    assert [t["event_type"] for t in timeline] == [
        "session.started",
        "message.added",
        "message.added",
        "search.performed",
        "session.ended",
        "summary.created",
    ]
    state = api.get(f"/v1/sessions/{session_id}/reconstruct").json()
    assert [m["content"] for m in state["messages"]] == ["I live in Paris.", "Noted!"]
    assert state["summary"] == "Lives in Paris" and state["searches"] == 1
    assert state["agent_id"] == "support" and state["ended_at"] is not None
    # An ended session takes no more messages.
    again = api.post(f"/v1/sessions/{session_id}/messages", {"messages": messages}, format="json")
    assert again.status_code == 400


@pytest.mark.django_db(transaction=True)
def test_memory_job_naming_a_session_records_its_messages(api, end_user) -> None:
    session_id = api.post("/v1/sessions", {"user_id": str(end_user.id)}, format="json").json()[
        "session_id"
    ]
    body = {
        "user_id": str(end_user.id),
        "session_id": session_id,
        "messages": [{"role": "user", "content": "I like tea."}],
    }
    assert api.post("/v1/memories", body, format="json").status_code == 202
    state = api.get(f"/v1/sessions/{session_id}/reconstruct").json()
    assert [m["content"] for m in state["messages"]] == ["I like tea."]


@pytest.mark.django_db(transaction=True)
def test_replay_by_time_range_returns_exactly_that_window(api, end_user) -> None:
    new_memory(end_user, "Before the window")
    time.sleep(0.05)
    since = timezone.now()
    inside = [new_memory(end_user, f"Inside {n}") for n in range(3)]
    until = timezone.now()
    time.sleep(0.05)
    new_memory(end_user, "After the window")

    params = {"since": since.isoformat(), "until": until.isoformat()}
    events = api.get("/v1/events", params).json()["events"]
    assert [e["memory"]["id"] for e in events] == [str(m.id) for m in inside]
    only_type = api.get("/v1/events", {**params, "type": "memory.updated"}).json()["events"]
    assert only_type == []


@pytest.mark.django_db(transaction=True)
def test_replay_never_shows_another_tenants_events(api, other_api, end_user) -> None:
    new_memory(end_user)
    assert len(api.get("/v1/events").json()["events"]) == 1
    assert other_api.get("/v1/events").json()["events"] == []


@pytest.mark.django_db
def test_replay_rejects_unknown_types_and_bad_times(api) -> None:
    assert "type" in api.get("/v1/events", {"type": "memory.exploded"}).json()["fields"]
    assert "since" in api.get("/v1/events", {"since": "yesterday"}).json()["fields"]


# --- Pull-sync -----------------------------------------------------------------------------------


def sync(api, user, since: str | None = None, limit: int = 500, expect: int = 0) -> dict:
    """One sync call; with `expect`, poll until that many changes show. A change shows once every
    transaction that began before it has ended, and parallel test processes share the cluster."""
    params = {"user_id": str(user.id), "limit": limit, **({"since": since} if since else {})}
    deadline = time.monotonic() + 15
    while True:
        response = api.get("/v1/sync", params)
        assert response.status_code == 200, response.content
        page = response.json()
        if len(page["changes"]) >= expect or time.monotonic() > deadline:
            return page
        time.sleep(0.05)


def sync_pages(api, user, *, total: int, limit: int) -> list[str]:
    """The ids of every change, cursor to cursor, `limit` a page, until no more (at most ten
    pages more than `total` needs)."""
    seen: list[str] = []
    cursor = None
    for _ in range(total // limit + 10):
        page = sync(api, user, since=cursor, limit=limit, expect=min(limit, total - len(seen)))
        seen += [c["id"] for c in page["changes"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    return seen


@pytest.mark.django_db(transaction=True)
def test_sync_returns_changes_since_the_cursor_with_tombstones(api, end_user) -> None:
    paris, tea = new_memory(end_user, "Lives in Paris"), new_memory(end_user, "Likes tea")
    first = sync(api, end_user, expect=2)
    assert [c["content"] for c in first["changes"]] == ["Lives in Paris", "Likes tea"]

    memory_writes.memory_update(
        tenant_id=paris.tenant_id,
        memory_id=paris.id,
        embedder=get_embedder(),
        content="Lives in Rome",
    )
    erasure.memory_forget(tenant_id=tea.tenant_id, memory_id=tea.id)
    second = sync(api, end_user, since=first["next_cursor"], expect=2)
    changes = {c["id"]: c for c in second["changes"]}
    assert changes[str(paris.id)]["content"] == "Lives in Rome"
    assert changes[str(tea.id)]["deleted"] is True
    assert len(changes) == 2

    assert sync(api, end_user, since=second["next_cursor"])["changes"] == []


@pytest.mark.django_db(transaction=True)
def test_sync_pages_through_everything_exactly_once(api, end_user) -> None:
    created = {str(new_memory(end_user, f"Fact {n}").id) for n in range(7)}
    seen = sync_pages(api, end_user, total=7, limit=3)
    assert sorted(seen) == sorted(created)


@pytest.mark.django_db(transaction=True)
def test_sync_pages_through_one_transactions_changes_exactly_once(api, end_user) -> None:
    # Rows written together share their transaction id: within it, pages go by memory id.
    with transaction.atomic():
        created = {str(new_memory(end_user, f"Fact {n}").id) for n in range(7)}
    seen = sync_pages(api, end_user, total=7, limit=3)
    assert len(seen) == 7 and set(seen) == created


@pytest.mark.django_db
def test_a_sync_page_starts_its_index_scan_at_the_cursor(end_user) -> None:
    # Not from the user's first change: a page must cost the same at the millionth change.
    cursor = (12345, "00000000-0000-0000-0000-000000000000")
    with CaptureQueriesContext(connection) as queries:
        selectors.memory_changes_since(user=end_user, cursor=cursor, limit=10)
    with connection.cursor() as cursor_:
        cursor_.execute("SET LOCAL enable_seqscan = off")  # a test table is small
        cursor_.execute("EXPLAIN " + queries[-1]["sql"])
        plan = "\n".join(row[0] for row in cursor_.fetchall())
    index_condition = next(line for line in plan.splitlines() if "Index Cond" in line)
    assert "change_txid >= 12345" in index_condition, plan


@pytest.mark.django_db(transaction=True)
def test_sync_waits_for_a_transaction_that_began_earlier(api, end_user) -> None:
    # A change committed late must not slip behind a cursor handed out meanwhile.
    import threading

    started, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        from django.db import connection

        try:
            with transaction.atomic():
                new_memory(end_user, "Written slowly")
                started.set()
                release.wait(10)
        finally:
            connection.close()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    started.wait(10)
    new_memory(end_user, "Written quickly")
    during = sync(api, end_user)
    release.set()
    writer.join()
    assert during["changes"] == []  # the quick one waits behind the slow, still-open transaction
    after = sync(api, end_user, since=during["next_cursor"] or None, expect=2)
    assert sorted(c["content"] for c in after["changes"]) == ["Written quickly", "Written slowly"]


@pytest.mark.django_db
def test_sync_rejects_a_malformed_cursor_and_other_tenants(api, other_api, end_user) -> None:
    response = api.get("/v1/sync", {"user_id": str(end_user.id), "since": "!!"})
    assert response.status_code == 400 and "since" in response.json()["fields"]
    assert other_api.get("/v1/sync", {"user_id": str(end_user.id)}).status_code == 404


def test_stream_is_trimmed_by_age(settings) -> None:
    from memories.events.publisher import trim_stream

    client = redis_client()
    client.delete(STREAM_KEY)
    fields = {"event": "{}", "type": "x", "tenant_id": "t", "user_id": "", "session_id": ""}
    old_ms = int((timezone.now() - timedelta(days=30)).timestamp() * 1000)
    client.xadd(STREAM_KEY, fields, id=f"{old_ms}-0")
    recent_id = client.xadd(STREAM_KEY, fields)
    settings.EVENT_STREAM_MAX_AGE_SECONDS = 24 * 3600
    trim_stream()
    assert [entry_id for entry_id, _ in client.xrange(STREAM_KEY)] == [recent_id]


@pytest.mark.django_db(transaction=True)
def test_each_outbox_row_of_a_job_is_marked_with_its_own_stream_entry(end_user) -> None:
    # A job's events are inserted in one statement and their ids come back in order; the
    # publisher pairs them with the stream ids by position, so an order mix-up would mark
    # each row with another event's entry.
    memory_request = submit_job(end_user, "I like tea. I play chess. I own a cat.")
    assert memory_request_run(request_id=str(memory_request.id)) == "done"
    rows = list(OutboxEvent.objects.filter(event_type="memory.created").order_by("id"))
    assert len(rows) == 3
    ids = [row.pk for row in rows]
    wait_for(
        lambda: all(row.published_at for row in OutboxEvent.objects.filter(pk__in=ids)),
        timeout=5,
        what="marks",
    )
    by_stream_id = {event["id"]: event for event in tenant_events(end_user.tenant)}
    for row in OutboxEvent.objects.filter(pk__in=ids):
        assert by_stream_id[row.stream_id]["event_id"] == row.payload["event_id"]
    contents = [row.payload["memory"]["content"] for row in rows]
    assert contents == [e["content"] for e in MemoryRequest.objects.get().result]


@pytest.mark.django_db(transaction=True)
def test_a_pool_process_marks_its_published_rows_before_it_exits(end_user, monkeypatch) -> None:
    # Celery ends a pool process with os._exit, past atexit: its shutdown signal marks the rows
    # it published, or the relay would send their events a second time.
    import threading

    from celery.signals import worker_process_shutdown

    import tasks.events  # noqa: F401 - a worker imports its tasks, and with them this hook

    # The background marker stays asleep: it waits on the event it already holds.
    monkeypatch.setattr(publisher._marks, "_wake", threading.Event())
    new_memory(end_user)
    row = OutboxEvent.objects.get()
    assert row.published_at is None  # published, and waiting for the marker
    worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    row.refresh_from_db()
    assert row.published_at is not None and row.stream_id


# --- One tenant's replay reads that tenant's entries ----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_small_tenants_replay_reads_its_own_entries_not_a_big_tenants(
    api, end_user, other_tenant, monkeypatch
) -> None:
    from memories.events import replay
    from memories.events.schema import build_event
    from memories.events.stream import tenant_stream_key

    loud = str(other_tenant.id)
    for _ in range(100):  # 100,000 events of the loud tenant, 1,000 a round trip
        publisher._send([build_event(event_type="search.performed", tenant_id=loud)] * 1000)
    mine = [new_memory(end_user, f"Fact {n}") for n in range(10)]
    reads: list[int] = []
    real_read_range = replay.read_range

    def counted(**kwargs):
        chunk = real_read_range(**kwargs)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(replay, "read_range", counted)
    try:
        events = api.get("/v1/events").json()["events"]
        assert [e["memory"]["id"] for e in events] == [str(m.id) for m in mine]
        assert sum(reads) == 10  # the loud tenant's 100,000 entries were never read
    finally:
        redis_client().delete(STREAM_KEY, tenant_stream_key(loud))


@pytest.mark.django_db(transaction=True)
def test_a_position_the_tenants_stream_can_no_longer_replay_from_is_410(
    api, end_user, settings
) -> None:
    new_memory(end_user, "One")
    first = api.get("/v1/events").json()["events"][0]["id"]
    new_memory(end_user, "Two")
    new_memory(end_user, "Three")
    settings.EVENT_STREAM_MAXLEN = 1
    publisher.trim_stream()  # the tenant's stream keeps "Three" alone: "Two" is gone
    response = api.get("/v1/events", {"after": first})
    assert response.status_code == 410 and response.json()["error"] == "cursor_expired"
    assert "/v1/sync" in response.json()["message"]
    last = api.get("/v1/events").json()["events"][-1]["id"]
    assert api.get("/v1/events", {"after": last}).json()["events"] == []  # a live one still works


@pytest.mark.django_db(transaction=True)
def test_replay_from_before_1970_starts_at_the_oldest_event(api, end_user) -> None:
    new_memory(end_user)  # found by the OpenAPI fuzzer: a negative stream id was a 500
    answer = api.get("/v1/events", {"since": "0714-04-27T04:54:37-04:24"})
    assert answer.status_code == 200
    assert len(answer.json()["events"]) == 1


@pytest.mark.django_db
def test_replay_after_a_stream_id_too_big_for_redis_is_a_400(api) -> None:
    answer = api.get("/v1/events", {"after": "99999999999999999999999-1"})
    assert answer.status_code == 400
    assert "after" in answer.json()["fields"]
