"""The Python SDK (`memoryclient`) against a real server: uvicorn in a thread, real PostgreSQL and
Redis, real Celery workers where a memory job runs. No call is mocked.

Tests of calls whose server side is still being built (issue 16) are skipped with the endpoint they
need; they are written to the contract in SPEC16 and run once those parts land.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from memories import accounts
from memories.models import Tenant
from memoryclient import (
    AsyncMemoryClient,
    Conflict,
    InvalidInput,
    LocalCache,
    MemoryClient,
    NotFound,
    PreconditionFailed,
    RateLimited,
    Subscription,
    Unauthorized,
    Unreachable,
)
from tests.helpers import wait_for
from tests.live_server import uvicorn_live_server

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # One server for the module: settings are read per request, so overrides still apply.
    with uvicorn_live_server() as base_url:
        yield base_url


@pytest.fixture
def key(tenant: Tenant) -> str:
    return accounts.api_key_create(tenant=tenant)[1]


@pytest.fixture
def client(server: str, key: str) -> Iterator[MemoryClient]:
    with MemoryClient(server, key, agent_id="agent-a", stream_read_timeout=20) as sdk:
        yield sdk


@pytest.fixture
def user_id(client: MemoryClient) -> str:
    return client.create_user(external_id="alice", metadata={"name": "Alice"})


def write_facts(client: MemoryClient, user_id: str, *contents: str) -> list[str]:
    """Memories written through the batch API (no model); their ids."""
    answer = client.batch([{"user_id": user_id, "content": text} for text in contents])
    assert answer["failed"] == 0, answer
    return [result["id"] for result in answer["results"]]


class Collector:
    """Reads a subscription in a thread, so a test can write and then look at what arrived."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.subscribed = threading.Event()
        subscription.on_subscribed = self.subscribed.set
        self.received: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.subscribed.wait(5), "the subscription never said `subscribed`"

    def _read(self) -> None:
        try:
            for event in self.subscription:
                self.received.put(event)
        except Exception as exc:  # surfaced by take()
            self.received.put(exc)

    def take(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        events, deadline = [], time.monotonic() + timeout
        while len(events) < count:
            item = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, Exception):
                raise item
            events.append(item)
        return events

    def close(self) -> None:
        self.subscription.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "close() did not end the reading thread"


# --- Users, jobs, memories ------------------------------------------------------------------------


def test_create_user_returns_its_id_and_get_user_reads_it_back(client: MemoryClient) -> None:
    user_id = client.create_user(external_id="bob", metadata={"plan": "pro"})
    user = client.get_user(user_id)
    assert user["user_id"] == user_id and user["external_id"] == "bob"
    assert user["metadata"] == {"plan": "pro"}
    erasure = client.delete_user(user_id)
    assert erasure["status"] == "pending" and erasure["request_id"]
    with pytest.raises(NotFound):
        client.get_user(user_id)


def test_add_with_wait_returns_the_finished_job_and_status_reads_it(
    client: MemoryClient, user_id: str, start_worker
) -> None:
    start_worker(queues="high,default")  # the offline providers: done in milliseconds
    done = client.add(user_id, "I live in Paris.", wait=15)
    assert done["status"] == "success", done
    assert [event["content"] for event in done["events"]] == ["Lives in Paris"]
    assert client.status(done["request_id"])["status"] == "success"
    memory_id = done["events"][0]["memory_id"]
    assert client.get(memory_id)["content"] == "Lives in Paris"


def test_list_iterates_over_every_page(client: MemoryClient, user_id: str) -> None:
    ids = write_facts(client, user_id, *(f"Fact number {n}" for n in range(7)))
    listed = [memory["id"] for memory in client.list(user_id, limit=3)]
    assert sorted(listed) == sorted(ids) and len(listed) == 7


def test_search_finds_the_memory_it_is_asked_about(client: MemoryClient, user_id: str) -> None:
    write_facts(client, user_id, "Loves green tea", "Works as a pilot", "Has a dog named Rex")
    results = client.search(user_id, "What is the dog called?", limit=1, mode="keyword")
    assert [result["content"] for result in results] == ["Has a dog named Rex"]


def test_update_with_a_stale_version_raises_precondition_failed_naming_the_current_one(
    client: MemoryClient, user_id: str
) -> None:
    (memory_id,) = write_facts(client, user_id, "Lives in Berlin")
    updated = client.update(memory_id, content="Lives in Berlin, Kreuzberg", if_version=1)
    assert updated["version"] == 2 and updated["content"] == "Lives in Berlin, Kreuzberg"
    with pytest.raises(PreconditionFailed) as refused:
        client.update(memory_id, content="Lives in Munich", if_version=1)
    assert refused.value.status == 412 and refused.value.current_version == 2
    assert client.get(memory_id)["content"] == "Lives in Berlin, Kreuzberg"
    history = client.history(memory_id)
    assert [entry["event"] for entry in history] == ["ADD", "UPDATE"]
    client.delete(memory_id)
    with pytest.raises(NotFound):
        client.get(memory_id)


def test_errors_carry_status_message_and_fields(server: str, client: MemoryClient) -> None:
    with MemoryClient(server, "not-a-key") as stranger, pytest.raises(Unauthorized) as no_key:
        stranger.create_user()
    assert no_key.value.status == 401 and no_key.value.message
    with pytest.raises(NotFound) as missing:
        client.get("00000000-0000-4000-8000-000000000000")
    assert missing.value.status == 404
    with pytest.raises(InvalidInput) as bad:
        client.search("not-a-uuid", "anything")
    assert bad.value.status == 400 and "user_id" in bad.value.fields


def test_unreachable_server_raises_unreachable(key: str) -> None:
    with (
        MemoryClient("http://127.0.0.1:9", key, timeout=2) as nowhere,
        pytest.raises(Unreachable) as failed,
    ):
        nowhere.create_user()
    assert failed.value.status == 0


def test_a_429_is_retried_after_retry_after_then_raised_once_retries_run_out(
    server: str, key: str, settings
) -> None:
    settings.RATE_LIMIT_PER_SECOND = 1  # Retry-After: 1 once the single token is spent
    settings.RATE_LIMIT_BURST = 1
    with MemoryClient(server, key, max_retries=2) as patient:
        patient.create_user()
        asked = time.monotonic()
        patient.create_user()  # refused once, then let through after Retry-After
        assert time.monotonic() - asked >= 0.9
    with MemoryClient(server, key, max_retries=0) as hasty, pytest.raises(RateLimited) as refused:
        hasty.create_user()
        hasty.create_user()
    assert refused.value.status == 429 and refused.value.retry_after == 1


# --- Events, subscriptions, sync ------------------------------------------------------------------


def test_events_returns_what_writes_published(client: MemoryClient, user_id: str) -> None:
    write_facts(client, user_id, "Collects stamps")
    wait_for(lambda: bool(client.events(user_id=user_id)), timeout=5, what="the event")
    (event,) = client.events(user_id=user_id, type="memory.created")
    assert event["memory"]["content"] == "Collects stamps" and event["id"]


def test_subscribe_delivers_events_and_resumes_after_the_last_event_id(
    client: MemoryClient, user_id: str
) -> None:
    channel = f"user:{user_id}:memories"
    first = Collector(client.subscribe([channel]))
    (memory_id,) = write_facts(client, user_id, "Plays chess")
    (created,) = first.take(1)
    assert created["event_type"] == "memory.created" and created["memory"]["id"] == memory_id
    assert created["id"] == first.subscription.last_event_id
    first.close()

    client.update(memory_id, content="Plays chess on Sundays")  # while nobody listens
    (other_id,) = write_facts(client, user_id, "Reads poetry")
    second = Collector(client.subscribe(channel, last_event_id=created["id"]))
    missed = second.take(2)
    second.close()
    assert [event["event_type"] for event in missed] == ["memory.updated", "memory.created"]
    assert missed[0]["memory"]["content"] == "Plays chess on Sundays"
    assert missed[1]["memory"]["id"] == other_id


def test_a_subscription_reconnects_by_itself_without_losing_events(
    key: str, tenant: Tenant
) -> None:
    with uvicorn_live_server() as base:
        port = urlsplit(base).port
        sdk = MemoryClient(base, key)
        user_id = sdk.create_user()
        collector = Collector(sdk.subscribe(f"user:{user_id}:memories"))
        write_facts(sdk, user_id, "Before the restart")
        assert collector.take(1)[0]["memory"]["content"] == "Before the restart"
    collector.subscribed.clear()
    with uvicorn_live_server(port=port or 0):
        write_facts(sdk, user_id, "During the reconnect")
        (event,) = collector.take(1, timeout=10)
        assert event["memory"]["content"] == "During the reconnect"
        collector.close()
        sdk.close()


def test_sync_returns_changes_and_a_cursor_to_continue_from(
    client: MemoryClient, user_id: str
) -> None:
    ids = write_facts(client, user_id, "Speaks Dutch", "Speaks Welsh")
    # Pull-sync shows a change once every transaction older than it has ended, on the whole
    # server (other tests' included): a client calls again; so does this test, for up to 5 s.
    first = synced(lambda: client.sync(user_id), count=2)
    assert sorted(change["id"] for change in first["changes"]) == sorted(ids)
    client.delete(ids[0])
    after = synced(lambda: client.sync(user_id, since=first["next_cursor"]), count=1)
    assert [(c["id"], c["deleted"]) for c in after["changes"]] == [(ids[0], True)]


def synced(call: Callable[[], dict], *, count: int) -> dict:
    """The sync page once it holds `count` changes, or the last one after 5 s."""
    deadline = time.monotonic() + 5
    while len((page := call())["changes"]) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return page


# --- The async client -----------------------------------------------------------------------------


def test_the_async_client_has_the_same_calls(server: str, key: str) -> None:
    async def scenario() -> None:
        async with AsyncMemoryClient(server, key, agent_id="agent-b") as sdk:
            user_id = await sdk.create_user(external_id="carol")
            assert (await sdk.get_user(user_id))["external_id"] == "carol"
            subscription = sdk.subscribe([f"user:{user_id}:memories"])
            events = aiter(subscription)
            first_event = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.5)  # connected and subscribed
            answer = await sdk.batch(
                [{"user_id": user_id, "content": f"Async fact {n}"} for n in range(4)]
            )
            ids = [result["id"] for result in answer["results"]]
            event = await asyncio.wait_for(first_event, 5)
            assert event["event_type"] == "memory.created" and event["memory"]["id"] in ids
            subscription.close()
            listed = [memory["id"] async for memory in sdk.list(user_id, limit=3)]
            assert sorted(listed) == sorted(ids)
            found = await sdk.search(user_id, "Async fact 2", mode="keyword", limit=1)
            assert found[0]["id"] == ids[2]
            await sdk.update(ids[0], content="Async fact zero", if_version=1)
            with pytest.raises(PreconditionFailed):
                await sdk.update(ids[0], content="stale", if_version=1)
            assert [e["event"] for e in await sdk.history(ids[0])] == ["ADD", "UPDATE"]
            await sdk.delete(ids[0])
            with pytest.raises(NotFound):
                await sdk.get(ids[0])
            assert len((await sdk.sync(user_id))["changes"]) == 4

    asyncio.run(scenario())


# --- LocalCache -----------------------------------------------------------------------------------


def test_the_cache_warms_up_and_sees_writes_within_a_second_without_polling(
    server: str, key: str, client: MemoryClient, user_id: str
) -> None:
    (old,) = write_facts(client, user_id, "Written before the cache")
    with MemoryClient(server, key, agent_id="agent-b") as other:
        cache = LocalCache(other, user_id, include_shared=False)
        cache.start()
        try:
            assert [m["id"] for m in cache.memories()] == [old]
            assert cache.staleness == 0.0
            written = time.monotonic()
            (new,) = write_facts(client, user_id, "Written by agent A")
            wait_for(lambda: cache.get(new) is not None, timeout=1, what="the new memory")
            assert time.monotonic() - written < 1
            client.update(new, content="Corrected by agent A")
            wait_for(lambda: (cache.get(new) or {}).get("version") == 2, timeout=1, what="update")
            assert cache.get(new)["content"] == "Corrected by agent A"  # type: ignore[index]
            client.delete(old)
            wait_for(lambda: cache.get(old) is None, timeout=1, what="the deletion")
        finally:
            cache.stop()
    assert cache.staleness > 0


def test_on_change_is_told_of_each_memory_the_cache_takes_in_and_of_each_that_leaves(
    server: str, key: str, client: MemoryClient, user_id: str
) -> None:
    (old,) = write_facts(client, user_id, "Written before the cache")
    told: queue.Queue[tuple[str, Any]] = queue.Queue()

    def on_change(memory_id: str, memory: dict[str, Any] | None) -> None:
        # What the cache holds when it tells: the listener can read it back at once.
        told.put((memory_id, memory and memory["version"], cache.get(memory_id) is not None))
        if memory is not None and memory["content"] == "Makes the listener fail":
            raise RuntimeError("a listener's bug")

    with MemoryClient(server, key, agent_id="agent-b") as other:
        cache = LocalCache(other, user_id, include_shared=False, on_change=on_change)
        cache.start()
        try:
            assert told.get(timeout=2) == (old, 1, True)  # the warm-up
            (new,) = write_facts(client, user_id, "Written by agent A")
            assert told.get(timeout=2) == (new, 1, True)
            client.update(new, content="Corrected by agent A")
            assert told.get(timeout=2) == (new, 2, True)
            client.delete(old)
            assert told.get(timeout=2) == (old, None, False)
            (failing,) = write_facts(client, user_id, "Makes the listener fail")
            assert told.get(timeout=2) == (failing, 1, True)
            (after,) = write_facts(client, user_id, "Still followed after the failure")
            assert told.get(timeout=2) == (after, 1, True)
            assert told.empty()  # nothing told twice, no replay reported
        finally:
            cache.stop()


@pytest.mark.parametrize("with_event_id", [True, False], ids=["last-event-id", "sync"])
def test_a_stopped_cache_catches_up_when_started_again(
    server: str, key: str, client: MemoryClient, user_id: str, with_event_id: bool
) -> None:
    kept, dropped = write_facts(client, user_id, "Kept", "Dropped")
    with MemoryClient(server, key) as other:
        cache = LocalCache(other, user_id, include_shared=False)
        cache.start()
        if with_event_id:  # an event seen before stopping: it resumes from there
            client.update(kept, content="Kept, seen live")
            wait_for(lambda: cache.last_event_id is not None, timeout=2, what="an event")
        cache.stop()
        client.update(kept, content="Kept, changed while stopped")
        client.delete(dropped)
        (added,) = write_facts(client, user_id, "Added while stopped")
        cache.start()
        try:
            wait_for(lambda: cache.get(added) is not None, timeout=2, what="the catch-up")
            assert cache.get(kept)["content"] == "Kept, changed while stopped"  # type: ignore[index]
            assert cache.get(dropped) is None
            assert sorted(m["id"] for m in cache.memories()) == sorted([kept, added])
        finally:
            cache.stop()


def test_a_cache_queues_an_update_while_the_server_is_down_and_sends_it_on_reconnect(
    key: str, tmp_path
) -> None:
    queue_file = tmp_path / "queue.jsonl"
    with uvicorn_live_server() as base:
        port = urlsplit(base).port
        sdk = MemoryClient(base, key, timeout=2)
        user_id = sdk.create_user()
        (memory_id,) = write_facts(sdk, user_id, "Drinks coffee")
        cache = LocalCache(sdk, user_id, include_shared=False, queue_path=queue_file)
        cache.start()
    # The server is gone: the write waits in the queue, on disk.
    assert cache.update(memory_id, content="Drinks tea now") is None
    assert len(cache.pending) == 1 and queue_file.read_text().count("\n") == 1
    with uvicorn_live_server(port=port or 0):
        wait_for(lambda: not cache.pending, timeout=10, what="the queue to be sent")
        wait_for(lambda: (cache.get(memory_id) or {}).get("version") == 2, timeout=2, what="v2")
        memory = sdk.get(memory_id)
        assert memory["content"] == "Drinks tea now" and memory["version"] == 2
        assert [e["event"] for e in sdk.history(memory_id)] == ["ADD", "UPDATE"]
        assert queue_file.read_text() == ""
        cache.stop()
        sdk.close()


# --- The MCP server -------------------------------------------------------------------------------


def test_the_mcp_server_over_stdio_lists_its_tools_and_searches(
    server: str, key: str, client: MemoryClient, user_id: str
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    write_facts(client, user_id, "Is allergic to peanuts", "Plays the cello")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "memoryclient.mcp"],
        env={**os.environ, "MEMORY_BASE_URL": server, "MEMORY_API_KEY": key},
    )

    async def scenario() -> tuple[set[str], dict[str, Any], Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            found = await session.call_tool(
                "search_memories",
                {"user_id": user_id, "query": "peanuts allergy", "limit": 1},
            )
            return set(tools), tools["search_memories"].input_schema, found

    names, schema, found = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert names == {
        "add_memory",
        "search_memories",
        "get_memory",
        "update_memory",
        "delete_memory",
        "list_memories",
    }
    assert schema["required"] == ["user_id", "query"]
    assert schema["properties"]["limit"]["type"] == "integer"
    assert not found.is_error
    assert "Is allergic to peanuts" in found.content[0].text
    assert "Plays the cello" not in found.content[0].text


def test_the_mcp_server_refuses_to_start_without_its_settings() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY_")}
    done = subprocess.run(
        [sys.executable, "-m", "memoryclient.mcp"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode != 0 and b"MEMORY_BASE_URL" in done.stderr


# --- Waiting for the server parts of issue 16 (unskip once they are merged) -----------------------


def test_two_agents_share_a_memory_through_a_live_cache_and_verify_it(
    server: str, key: str, client: MemoryClient, user_id: str
) -> None:
    with MemoryClient(server, key, agent_id="agent-b") as agent_b:
        cache = LocalCache(agent_b, user_id)  # include_shared: the tenant's channel too
        cache.start()
        try:
            written = time.monotonic()
            shared = client.write(None, "The office closes at 6pm", scope="tenant")
            assert shared["user_id"] is None and shared["version"] == 1
            wait_for(lambda: cache.get(shared["id"]) is not None, timeout=1, what="shared")
            assert time.monotonic() - written < 1
            assert cache.verify()
            cache.stop()
            client.update(shared["id"], content="The office closes at 7pm")
            mine = client.write(user_id, "Prefers window seats")
            cache.start()
            wait_for(lambda: cache.get(mine["id"]) is not None, timeout=2, what="catch-up")
            assert cache.get(shared["id"])["content"] == "The office closes at 7pm"  # type: ignore[index]
            assert cache.verify()
        finally:
            cache.stop()


def test_a_write_sent_again_with_its_idempotency_key_is_applied_once(
    client: MemoryClient, user_id: str
) -> None:
    (memory_id,) = write_facts(client, user_id, "Drinks coffee")
    first = client.update(memory_id, content="Drinks tea", idempotency_key="k-1")
    again = client.update(memory_id, content="Drinks tea", idempotency_key="k-1")  # answer lost
    assert again == first and client.get(memory_id)["version"] == 2
    created = client.write(user_id, "Owns a bike", idempotency_key="k-2")
    assert client.write(user_id, "Owns a bike", idempotency_key="k-2")["id"] == created["id"]
    with pytest.raises(InvalidInput) as reused:
        client.update(memory_id, content="Drinks water", idempotency_key="k-1")
    assert reused.value.status == 422


def test_a_forbidden_call_names_the_missing_grant(
    server: str, client: MemoryClient, user_id: str
) -> None:
    from memoryclient import Forbidden

    created = httpx.post(
        f"{server}/v1/keys",
        headers={"Authorization": f"Bearer {client.api_key}"},
        json={"name": "reader", "role": "read-only", "grants": [f"user:{user_id}"]},
    ).json()
    with MemoryClient(server, created["key"]) as reader, pytest.raises(Forbidden) as refused:
        reader.batch([{"user_id": user_id, "content": "Not allowed"}])
    assert refused.value.status == 403 and refused.value.missing_grant


def test_a_lazy_subscription_gets_one_entry_per_memory_per_window(
    client: MemoryClient, user_id: str
) -> None:
    (memory_id,) = write_facts(client, user_id, "Counter at 0")
    # A window long enough for the 20 updates on a loaded machine: they arrive as one entry.
    collector = Collector(client.subscribe(f"user:{user_id}:memories", batch_ms=5000))
    for n in range(1, 21):
        client.update(memory_id, content=f"Counter at {n}")
    (event,) = collector.take(1, timeout=15)
    collector.close()
    assert event["memory"]["content"] == "Counter at 20" and event["memory"]["version"] == 21


# --- Lists, counters and conflicts through the SDK --------------------------------------------


def test_counters_and_lists_merge_the_changes_of_two_agents(server: str, key: str) -> None:
    with (
        MemoryClient(server, key, agent_id="phone") as phone,
        MemoryClient(server, key, agent_id="laptop") as laptop,
    ):
        visits = phone.write(None, "Store visits", type="counter", scope="topic", topic="shop")
        assert visits["value"] == 0 and visits["user_id"] is None
        phone.increment(visits["id"], 3)
        assert laptop.increment(visits["id"], -1)["value"] == 2
        assert laptop.get(visits["id"])["clock"] == {"phone": 2, "laptop": 1}

        groceries = phone.write(None, "Groceries", type="list", scope="tenant", items=["milk"])
        assert laptop.list_add(groceries["id"], ["eggs"])["items"] == ["milk", "eggs"]
        assert phone.list_remove(groceries["id"], ["milk"])["items"] == ["eggs"]


def test_a_manual_conflict_is_raised_listed_and_resolved_through_the_sdk(
    server: str, key: str, user_id: str
) -> None:
    with (
        MemoryClient(server, key, agent_id="a") as first,
        MemoryClient(server, key, agent_id="b") as second,
    ):
        memory = first.write(user_id, "Budget 10k", merge="manual")
        base = memory["clock"]
        first.update(memory["id"], content="Budget 12k", base_clock=base)
        with pytest.raises(Conflict) as raised:
            second.update(memory["id"], content="Budget 9k", base_clock=base)
        assert raised.value.status == 409
        conflict = raised.value.body["conflict"]
        assert [c["id"] for c in second.conflicts()] == [conflict["id"]]
        assert first.get(memory["id"])["conflicted"] is True
        resolved = second.resolve(conflict["id"], choose="incoming")
        assert resolved["memory"]["content"] == "Budget 9k"
        assert second.conflicts() == []
        history = [entry["new_content"] for entry in first.history(memory["id"])]
        assert history[-1] == "Budget 9k"
