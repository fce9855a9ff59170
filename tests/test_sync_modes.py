"""Sync modes: the lazy stream (`batch_ms`, over real HTTP), pull-sync over shared sets, its
digest, and tombstones purged after their retention (then `410 cursor_expired`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.db import transaction
from django.utils import timezone

from memories import accounts, events, sync
from memories.events import sse
from memories.models import EndUser, Memory, MemoryHistory, Tenant
from tasks.sync import purge_sync_tombstones
from tests.helpers import store_memories
from tests.live_server import uvicorn_live_server
from tests.test_sse import Stream, user_channel

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_live_server() as base_url:
        yield base_url


@pytest.fixture
def key(tenant: Tenant) -> str:
    return accounts.api_key_create(tenant=tenant)[1]


def shared_memory(tenant: Tenant, content: str, *, topic: str = "") -> Memory:
    """A memory of the tenant (scope tenant) or of a topic: no owning user."""
    return Memory.objects.create(
        tenant=tenant,
        user=None,
        scope=Memory.Scope.TOPIC if topic else Memory.Scope.TENANT,
        topic=topic,
        content=content,
        content_hash=hashlib.sha256(content.encode()).hexdigest(),
    )


def sync_all(api, **params) -> tuple[list[dict], str]:
    """Every change of the sets named, page by page (polling until the writes settle)."""
    expect = params.pop("expect", 0)
    changes: list[dict] = []
    deadline = time.monotonic() + 15
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"since": cursor} if cursor else {})}
        response = api.get("/v1/sync", query)
        assert response.status_code == 200, response.content
        page = response.json()
        changes += page["changes"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            if expect <= len(changes) or time.monotonic() > deadline:
                return changes, cursor
            time.sleep(0.05)


def expected_digest(memories: list[Memory]) -> dict:
    lines = sorted(f"{m.id}:{m.version}" for m in memories)
    return {"count": len(lines), "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


# --- Lazy stream ---------------------------------------------------------------------------------


def burst_of_updates(memory: Memory, count: int) -> None:
    """`count` updates of one memory, each its own transaction and event, as fast as they go."""
    for n in range(1, count + 1):
        with transaction.atomic():
            memory.content, memory.version = f"v{n}", memory.version + 1
            Memory.objects.filter(pk=memory.pk).update(content=memory.content, version=n + 1)
            events.record_many([events.memory_event(memory, "memory.updated")])


def open_lazy(server: str, key: str, channels: list[str], batch_ms: int, **headers: str):
    read = max(5.0, batch_ms / 1000 + 10)  # a frame may come only when its window ends
    return httpx.Client(timeout=httpx.Timeout(5.0, read=read)).stream(
        "GET",
        f"{server}/v1/stream",
        params={"channels": ",".join(channels), "batch_ms": batch_ms},
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def test_a_hundred_updates_of_one_memory_in_a_window_arrive_as_one_entry_with_the_final_state(
    server, key, end_user
) -> None:
    [memory] = store_memories(end_user, "v0")
    other = store_memories(end_user, "other")[0]
    # A window long enough for the hundred updates on a loaded machine.
    with open_lazy(server, key, [user_channel(end_user)], 8_000) as response:
        assert response.status_code == 200
        stream = Stream(response)
        assert stream.next().comment == "subscribed"
        burst_of_updates(memory, 100)
        Memory.objects.filter(pk=other.pk).update(content="other, changed")
        other.content = "other, changed"
        events.record_many([events.memory_event(other, "memory.updated")])
        [batch] = stream.events(1)
    assert batch.event == "batch"
    entries = batch.json()["events"]
    assert [e["memory"]["id"] for e in entries] == [str(memory.id), str(other.id)]
    assert entries[0]["memory"]["content"] == "v100" and entries[0]["memory"]["version"] == 101
    assert batch.id == entries[-1]["id"]  # the last included event's stream id


def test_a_deletion_in_a_window_is_kept_and_other_events_pass_through_in_order(
    server, key, api, end_user
) -> None:
    [memory] = store_memories(end_user, "v0")
    with open_lazy(server, key, [user_channel(end_user)], 1_500) as response:
        stream = Stream(response)
        assert stream.next().comment == "subscribed"
        burst_of_updates(memory, 3)
        session = api.post("/v1/sessions", {"user_id": str(end_user.id)}, format="json").json()
        assert api.delete(f"/v1/memories/{memory.id}").status_code == 204
        [batch] = stream.events(1)
    entries = batch.json()["events"]
    assert [e["event_type"] for e in entries] == ["session.started", "memory.deleted"]
    assert entries[0]["source"]["session_id"] == session["session_id"]
    assert entries[1]["memory"]["id"] == str(memory.id)


def test_last_event_id_of_a_batch_resumes_after_it_with_the_missed_changes_batched(
    server, key, end_user
) -> None:
    [memory] = store_memories(end_user, "v0")
    [other] = store_memories(end_user, "w0")
    channels = [user_channel(end_user)]
    with open_lazy(server, key, channels, 300) as response:
        stream = Stream(response)
        assert stream.next().comment == "subscribed"
        burst_of_updates(memory, 5)
        [first] = stream.events(1)
    assert first.json()["events"][-1]["memory"]["content"] == "v5"
    burst_of_updates(memory, 3)  # v1..v3 again: missed while away
    burst_of_updates(other, 2)
    with open_lazy(server, key, channels, 300, **{"Last-Event-ID": first.id}) as response:
        stream = Stream(response)
        assert stream.next().comment == "subscribed"
        [missed] = stream.events(1)
    contents = {e["memory"]["id"]: e["memory"]["content"] for e in missed.json()["events"]}
    assert contents == {str(memory.id): "v3", str(other.id): "v2"}
    assert sse.stream_id_order(missed.id) > sse.stream_id_order(first.id)


@pytest.mark.parametrize("value", ["0", "60001", "abc", "-5", "1.5"])
def test_bad_batch_ms_is_400_naming_it(server, key, end_user, value) -> None:
    response = httpx.get(
        f"{server}/v1/stream",
        params={"channels": user_channel(end_user), "batch_ms": value},
        headers={"Authorization": f"Bearer {key}"},
        timeout=5.0,
    )
    assert response.status_code == 400
    assert list(response.json()["fields"]) == ["batch_ms"]


# --- Pull-sync over shared sets ------------------------------------------------------------------


def test_sync_unions_the_users_memories_the_shared_ones_and_the_topics_named(
    api, tenant, end_user, other_tenant
) -> None:
    [own] = store_memories(end_user, "Likes tea")
    shared = shared_memory(tenant, "Office closes at 6")
    news = shared_memory(tenant, "Launch on Monday", topic="news")
    shared_memory(tenant, "Not asked for", topic="gossip")
    shared_memory(other_tenant, "Another tenant's", topic="news")
    user = str(end_user.id)

    mine, _ = sync_all(api, user_id=user, expect=1)
    assert [c["id"] for c in mine] == [str(own.id)]
    union, _ = sync_all(api, user_id=user, include_shared="true", topics="news", expect=3)
    assert {c["id"] for c in union} == {str(own.id), str(shared.id), str(news.id)}
    tenant_only, _ = sync_all(api, scope="tenant", expect=1)
    assert [c["id"] for c in tenant_only] == [str(shared.id)]
    topic_only, _ = sync_all(api, topic="news", expect=1)
    assert [c["id"] for c in topic_only] == [str(news.id)]
    assert topic_only[0]["user_id"] is None and topic_only[0]["scope"] == "topic"


def test_one_cursor_over_the_union_hands_out_later_changes_of_every_set_once(
    api, tenant, end_user
) -> None:
    store_memories(end_user, "Likes tea")
    shared = shared_memory(tenant, "Office closes at 6")
    params = {"user_id": str(end_user.id), "include_shared": "true", "topics": "news"}
    _, cursor = sync_all(api, **params, expect=2)
    news = shared_memory(tenant, "Launch on Monday", topic="news")
    Memory.objects.filter(pk=shared.pk).update(content="Office closes at 7", version=2)
    later, _ = sync_all(api, **params, since=cursor, expect=2)
    assert sorted(c["id"] for c in later) == sorted([str(news.id), str(shared.id)])


@pytest.mark.parametrize(
    "params",
    [{}, {"scope": "tenant", "topic": "news"}, {"topics": "news"}, {"scope": "nope"}],
)
def test_sync_wants_exactly_one_set_and_says_which_field_is_wrong(api, params) -> None:
    response = api.get("/v1/sync", params)
    assert response.status_code == 400
    assert response.json()["fields"]


def test_the_digest_is_count_and_sha256_of_the_live_sets_id_version_lines(
    api, tenant, end_user
) -> None:
    user = str(end_user.id)
    empty = api.get("/v1/sync/digest", {"user_id": user}).json()
    assert empty == {"count": 0, "hash": hashlib.sha256(b"").hexdigest()}
    live = store_memories(end_user, "Likes tea", "Lives in Lyon")
    [closed, forgotten] = store_memories(end_user, "Lives in Paris", "A secret")
    Memory.objects.filter(pk=closed.pk).update(valid_to=timezone.now())
    assert api.delete(f"/v1/memories/{forgotten.id}").status_code == 204
    Memory.objects.filter(pk=live[0].pk).update(version=7)
    live[0].version = 7
    shared = shared_memory(tenant, "Office closes at 6")

    assert api.get("/v1/sync/digest", {"user_id": user}).json() == expected_digest(live)
    both = api.get("/v1/sync/digest", {"user_id": user, "include_shared": "true"}).json()
    assert both == expected_digest([*live, shared])
    assert api.get("/v1/sync/digest", {"scope": "tenant"}).json() == expected_digest([shared])


# --- Tombstones purged after their retention -----------------------------------------------------


def forget(api, memory: Memory, *, days_ago: float) -> None:
    assert api.delete(f"/v1/memories/{memory.id}").status_code == 204
    Memory.objects.filter(pk=memory.pk).update(deleted_at=timezone.now() - timedelta(days=days_ago))


def test_old_tombstones_are_purged_and_a_cursor_from_before_them_is_410_with_the_snapshot(
    api, end_user, settings
) -> None:
    settings.SYNC_TOMBSTONE_RETENTION_DAYS = 30
    old, young, kept = store_memories(end_user, "Old secret", "Young secret", "Likes tea")
    params = {"user_id": str(end_user.id), "include_shared": "true"}
    _, early_cursor = sync_all(api, **params, expect=3)
    forget(api, old, days_ago=31)
    forget(api, young, days_ago=29)
    _, late_cursor = sync_all(api, **params, since=early_cursor, expect=2)

    assert purge_sync_tombstones() == 1
    assert not Memory.objects.filter(pk=old.pk).exists()
    assert not MemoryHistory.objects.filter(memory_id=old.pk).exists()
    assert Memory.objects.filter(pk=young.pk, deleted_at__isnull=False).exists()

    response = api.get("/v1/sync", {**params, "since": early_cursor, "limit": 10})
    assert response.status_code == 410
    body = response.json()
    assert body["error"] == "cursor_expired" and body["message"]
    snapshot = urlsplit(body["snapshot"])
    assert snapshot.path == "/v1/sync"
    assert parse_qs(snapshot.query) == {
        "user_id": [str(end_user.id)],
        "include_shared": ["true"],
        "limit": ["10"],
    }
    rebuilt = api.get(body["snapshot"]).json()["changes"]
    assert {c["id"] for c in rebuilt} == {str(young.id), str(kept.id)}
    # A cursor that had seen the purged deletion misses nothing: it goes on.
    assert api.get("/v1/sync", {**params, "since": late_cursor}).status_code == 200


def test_a_purge_with_nothing_old_enough_keeps_every_cursor(api, end_user) -> None:
    [memory] = store_memories(end_user, "A secret")
    _, cursor = sync_all(api, user_id=str(end_user.id), expect=1)
    forget(api, memory, days_ago=1)
    assert sync.sync_tombstones_purge() == 0
    response = api.get("/v1/sync", {"user_id": str(end_user.id), "since": cursor})
    assert response.status_code == 200


def test_one_tenants_purge_leaves_another_tenants_cursors_alone(
    api, other_api, end_user, other_tenant
) -> None:
    other_user = EndUser.objects.create(tenant=other_tenant, external_id="bob")
    store_memories(other_user, "Bob's")
    _, other_cursor = sync_all(other_api, user_id=str(other_user.id), expect=1)
    [memory] = store_memories(end_user, "A secret")
    forget(api, memory, days_ago=40)
    assert sync.sync_tombstones_purge() == 1
    response = other_api.get("/v1/sync", {"user_id": str(other_user.id), "since": other_cursor})
    assert response.status_code == 200
