"""`GET /v1/stream` over real HTTP: uvicorn in a thread, real PostgreSQL and Redis, httpx clients.

Events come from real writes (API calls, or model saves for shared memories) published on commit.
Every read has a timeout, so a missing event fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx
import pytest
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from memories import accounts, events, memory_writes
from memories.events import publisher, sse
from memories.events.stream import STREAM_KEY, redis_client
from memories.models import ApiKey, EndUser, Memory, Tenant
from memories.providers.wiring import get_embedder
from tests.helpers import metric_value, wait_for
from tests.live_server import uvicorn_live_server

pytestmark = pytest.mark.django_db(transaction=True)

READ_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # One server for the module: settings are read per connection, so overrides still apply.
    with uvicorn_live_server() as base_url:
        yield base_url


@pytest.fixture
def key(tenant: Tenant) -> str:
    return accounts.api_key_create(tenant=tenant)[1]


@pytest.fixture
def other_key(other_tenant: Tenant) -> str:
    return accounts.api_key_create(tenant=other_tenant)[1]


# --- An SSE client with deadlines ----------------------------------------------------------------


@dataclass
class Message:
    event: str | None = None
    id: str | None = None
    data: str = ""
    comment: str | None = None

    def json(self) -> dict:
        return json.loads(self.data)


class Stream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> Message:
        """The next event or comment; raises httpx.ReadTimeout if none comes in time."""
        message = Message()
        for line in self._lines:
            if line == "":
                if message.event or message.data or message.comment is not None:
                    return message
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                message.comment = value
            elif name == "data":
                message.data += value
            elif name in ("event", "id"):
                setattr(message, name, value)
        raise EOFError("the stream ended")

    def events(self, count: int) -> list[Message]:
        """The next `count` events, comments skipped."""
        events: list[Message] = []
        deadline = time.monotonic() + 10
        while len(events) < count:
            assert time.monotonic() < deadline, f"only {len(events)} of {count} events came"
            message = self.next()
            if message.comment is None:
                events.append(message)
        return events

    def rest(self) -> list[Message]:
        """Every message until the server ends the stream."""
        messages: list[Message] = []
        while True:
            try:
                messages.append(self.next())
            except EOFError:
                return messages


@contextmanager
def open_stream(
    base_url: str,
    key: str,
    channels: list[str],
    *,
    types: str | None = None,
    last_event_id: str | None = None,
) -> Iterator[Stream]:
    """An open stream, already subscribed (its `: subscribed` line has been read)."""
    params = {"channels": ",".join(channels), **({"types": types} if types else {})}
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    timeout = httpx.Timeout(5.0, read=READ_TIMEOUT)
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("GET", f"{base_url}/v1/stream", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        stream = Stream(response)
        assert stream.next().comment == "subscribed"
        yield stream


def refusal(base_url: str, key: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{base_url}/v1/stream", params=params, headers=headers, timeout=5.0)


# --- Writes that publish events -------------------------------------------------------------------


def memory_create(user: EndUser, content: str, *, scope: str = "user", topic: str = "") -> Memory:
    return Memory.objects.create(
        tenant=user.tenant,
        user=user,
        content=content,
        embedding=get_embedder().embed([content])[0],
        content_hash=memory_writes.content_hash(content),
        scope=scope,
        topic=topic,
    )


def correct(api: APIClient, memory: Memory, content: str) -> None:
    response = api.patch(f"/v1/memories/{memory.id}", {"content": content}, format="json")
    assert response.status_code == 200, response.content


def bulk_correct(memory: Memory, contents: list[str]) -> None:
    """Many changes in one transaction, their events published together (as bulk writes do)."""
    changed = []
    with transaction.atomic():
        for content in contents:
            memory.content, memory.version = content, memory.version + 1
            Memory.objects.filter(pk=memory.pk).update(content=content, version=memory.version)
            changed.append(events.memory_event(memory, "memory.updated"))
        events.record_many(changed)


def user_channel(user: EndUser) -> str:
    return f"user:{user.id}:memories"


# --- Delivery ------------------------------------------------------------------------------------


def test_a_correction_through_the_api_reaches_a_user_channel_subscriber(
    server, key, api, end_user
) -> None:
    memory = memory_create(end_user, "I live in Paris.")
    with open_stream(server, key, [user_channel(end_user)]) as stream:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-cache"
        assert stream.response.headers["x-accel-buffering"] == "no"
        correct(api, memory, "I live in Lyon.")
        [message] = stream.events(1)
    event = message.json()
    assert message.event == event["event_type"] == "memory.updated"
    assert event["memory"]["id"] == str(memory.id)
    assert event["memory"]["content"] == "I live in Lyon."
    assert event["source"]["user_id"] == str(end_user.id)
    assert event["id"] == message.id
    [(entry_id, fields)] = redis_client().xrange(STREAM_KEY, min=message.id, max=message.id)
    assert json.loads(fields["event"])["event_id"] == event["event_id"]


def test_type_filter_delivers_only_the_named_types(server, key, api, end_user) -> None:
    memory = memory_create(end_user, "I like tea.")
    with open_stream(server, key, [user_channel(end_user)], types="memory.deleted") as stream:
        correct(api, memory, "I like green tea.")
        assert api.delete(f"/v1/memories/{memory.id}").status_code == 204
        [message] = stream.events(1)
    assert message.event == "memory.deleted"
    assert message.json()["memory"]["id"] == str(memory.id)


def test_another_tenant_hears_nothing_of_ours_even_on_the_same_topic_name(
    server, key, other_key, end_user, other_tenant
) -> None:
    stranger = accounts.end_user_create(tenant=other_tenant, external_id="bob")
    channels = ["topic:news:updates", "system:global"]
    with (
        open_stream(server, key, channels) as ours,
        open_stream(server, other_key, [*channels, f"tenant:{other_tenant.id}:shared"]) as theirs,
    ):
        memory_create(end_user, "Ours, first.", scope="topic", topic="news")
        memory_create(end_user, "Ours, shared.", scope="tenant")
        memory_create(stranger, "Theirs.", scope="topic", topic="news")
        memory_create(end_user, "Ours, second.", scope="topic", topic="news")
        # Stream order is commit order: had ours reached them, it would come before theirs.
        assert [m.json()["memory"]["content"] for m in theirs.events(1)] == ["Theirs."]
        assert [m.json()["memory"]["content"] for m in ours.events(2)] == [
            "Ours, first.",
            "Ours, second.",
        ]


# --- Who may subscribe ----------------------------------------------------------------------------


def test_missing_or_invalid_key_is_401(server, end_user) -> None:
    channels = user_channel(end_user)
    for key in (None, "mem_not-a-real-key"):
        response = refusal(server, key, channels=channels)
        assert response.status_code == 401
        assert response.json()["error"] in ("not_authenticated", "authentication_failed")


def test_only_get_is_allowed(server, key, end_user) -> None:
    response = httpx.post(
        f"{server}/v1/stream",
        params={"channels": user_channel(end_user)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=5.0,
    )
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_channels_of_another_tenant_are_403(server, other_key, end_user, tenant) -> None:
    for channel in (
        user_channel(end_user),
        f"tenant:{tenant.id}:shared",
        "user:00000000-0000-0000-0000-000000000000:memories",
    ):
        response = refusal(server, other_key, channels=channel)
        assert response.status_code == 403, channel
        assert "channels" in response.json()["fields"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "channels"),
        ({"channels": "memories"}, "channels"),
        ({"channels": "user:not-a-uuid:memories"}, "channels"),
        ({"channels": "system:global", "types": "memory.created,memory.exploded"}, "types"),
        ({"channels": "system:global", "last_event_id": "yesterday"}, "Last-Event-ID"),
    ],
)
def test_malformed_request_is_400_naming_the_field(server, key, params, field) -> None:
    response = refusal(server, key, **params)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["fields"]


def test_stream_is_503_when_the_hub_cannot_start(server, key, monkeypatch) -> None:
    async def never_ready(self, timeout: float) -> None:
        raise TimeoutError

    monkeypatch.setattr(sse.Hub, "wait_ready", never_ready)
    response = refusal(server, key, channels="system:global")
    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"


def test_an_unexpected_error_while_checking_the_request_is_a_json_500(
    server, key, monkeypatch
) -> None:
    def broken(header: str) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(sse, "api_key_authenticate", broken)
    response = refusal(server, key, channels="system:global")
    assert response.status_code == 500
    assert response.json()["error"] == "server_error"


def test_streams_and_refusals_carry_the_same_security_headers_as_the_api(server, key) -> None:
    names = ("x-content-type-options", "referrer-policy", "cross-origin-opener-policy")
    expected = {name: httpx.get(f"{server}/healthz").headers[name] for name in names}
    refused = refusal(server, None, channels="system:global")
    with open_stream(server, key, ["system:global"]) as stream:
        served = stream.response
    for response in (refused, served):
        assert {name: response.headers.get(name) for name in names} == expected


def test_open_streams_do_not_hold_a_thread_each(server, key) -> None:
    count = 12
    with open_stream(server, key, ["system:global"]):
        before = threading.active_count()  # the server's pools have started by now
        with ExitStack() as streams:
            for _ in range(count):
                streams.enter_context(open_stream(server, key, ["system:global"]))
            during = threading.active_count()
    # Keys are checked in a shared pool of a few threads; nothing is kept per open stream.
    assert during - before < count


# --- Resuming -----------------------------------------------------------------------------------


def test_reconnect_with_last_event_id_gets_exactly_the_missed_changes_in_order(
    server, key, api, end_user
) -> None:
    memory = memory_create(end_user, "v0")
    channels = [user_channel(end_user)]
    with open_stream(server, key, channels) as stream:
        correct(api, memory, "v1")
        [seen] = stream.events(1)
    for content in ("v2", "v3", "v4"):
        correct(api, memory, content)
    with open_stream(server, key, channels, last_event_id=seen.id) as stream:
        missed = stream.events(3)
        correct(api, memory, "v5")
        [live] = stream.events(1)
    assert [m.json()["memory"]["content"] for m in missed] == ["v2", "v3", "v4"]
    ids = [sse.stream_id_order(m.id) for m in [seen, *missed, live]]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert live.json()["memory"]["content"] == "v5"


def test_last_event_id_older_than_the_trimmed_stream_gets_stream_reset(
    server, key, api, end_user, settings
) -> None:
    memory = memory_create(end_user, "v0")
    channels = [user_channel(end_user)]
    with open_stream(server, key, channels) as stream:
        for content in ("v1", "v2", "v3"):
            correct(api, memory, content)
        first, _, third = stream.events(3)
    settings.EVENT_STREAM_MAXLEN = 1
    publisher.trim_stream()  # the tenant's stream keeps `third` alone
    with open_stream(server, key, channels, last_event_id=first.id) as stream:
        [reset] = stream.events(1)
        correct(api, memory, "v4")
        [live] = stream.events(1)
    assert reset.event == "stream-reset"
    assert "/v1/sync" in reset.json()["message"]
    assert live.event == "memory.updated" and live.json()["memory"]["content"] == "v4"


def test_hub_reconnects_after_losing_redis_without_losing_events(
    server, key, api, end_user
) -> None:
    memory = memory_create(end_user, "v0")
    redis = redis_client()
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    with open_stream(server, key, [user_channel(end_user)]) as stream:
        readers = [
            client["id"]
            for client in redis.client_list()
            if client["cmd"] == "xread" and int(client["db"]) == db
        ]
        assert readers, "the hub should be blocked in XREAD"
        for client_id in readers:
            redis.client_kill_filter(_id=client_id)
        correct(api, memory, "v1")  # while the hub may still be reconnecting
        [message] = stream.events(1)
    assert message.json()["memory"]["content"] == "v1"


def test_an_event_both_replayed_and_queued_live_is_sent_once(tenant, end_user) -> None:
    memory = memory_create(end_user, "v0")

    def write_three() -> None:
        for content in ("v1", "v2", "v3"):
            memory_writes.memory_update(
                tenant_id=memory.tenant_id,
                memory_id=memory.id,
                embedder=get_embedder(),
                content=content,
            )
        connection.close()  # this thread's own connection

    async def scenario() -> list[bytes]:
        hub = sse.Hub(django_settings.REDIS_URL)
        await hub.wait_ready(timeout=5)
        wanted = sse.StreamRequest(
            tenant_id=str(tenant.id),
            api_key_id="",
            channels=(user_channel(end_user),),
            types=None,
            last_event_id=hub.position,
        )
        body = sse.event_stream(hub, wanted, buffer=100, heartbeat=0.3)
        assert await anext(body) == sse.SUBSCRIBED
        # Written after the subscriber joined: the hub queues them live, and the replay that
        # follows (from the Last-Event-ID) reads the same three from the stream.
        await asyncio.to_thread(write_three)
        newest = redis_client().xrevrange(STREAM_KEY, count=1)[0][0]
        async with asyncio.timeout(5):
            while hub.position != newest:
                await asyncio.sleep(0.01)
            chunks = []
            while sse.HEARTBEAT not in chunks:
                chunks.append(await anext(body))
        await body.aclose()
        return chunks

    chunks = asyncio.run(scenario())
    assert [chunk.split(b"\n")[1] for chunk in chunks[:-1]] == [b"event: memory.updated"] * 3
    assert chunks[-1] == sse.HEARTBEAT


# --- Slow clients, idle clients, leaving ----------------------------------------------------------


def test_slow_subscriber_gets_overflow_with_a_resumable_id_while_a_fast_one_gets_everything(
    server, key, end_user, settings
) -> None:
    memory = memory_create(end_user, "v0")
    channels = [user_channel(end_user)]
    count = 50
    settings.SSE_CLIENT_BUFFER = 2
    with open_stream(server, key, channels) as slow:
        settings.SSE_CLIENT_BUFFER = 1000
        with open_stream(server, key, channels) as fast:
            bulk_correct(memory, [f"v{n}" for n in range(1, count + 1)])
            everything = fast.events(count)
        # The slow client reads only now: what was queued, then `overflow`, then the end.
        *delivered, overflow = [m for m in slow.rest() if m.comment is None]
    assert [m.json()["memory"]["content"] for m in everything] == [
        f"v{n}" for n in range(1, count + 1)
    ]
    assert overflow.event == "overflow"
    assert 0 < len(delivered) < count
    assert overflow.json()["last_event_id"] == overflow.id == delivered[-1].id
    with open_stream(server, key, channels, last_event_id=overflow.id) as again:
        rest = again.events(count - len(delivered))
    assert [m.id for m in delivered + rest] == [m.id for m in everything]


def test_idle_stream_gets_heartbeats(server, key, end_user, settings) -> None:
    settings.SSE_HEARTBEAT_SECONDS = 0.2
    with open_stream(server, key, [user_channel(end_user)]) as stream:
        started = time.monotonic()
        assert stream.next().comment == "heartbeat"
        assert stream.next().comment == "heartbeat"
        assert time.monotonic() - started < 2


def test_a_client_that_disconnects_leaves_the_hub(server, key, end_user) -> None:
    def subscribers_settle_at(expected: int) -> int:
        deadline = time.monotonic() + 3
        while sse._hub.subscriber_count != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return sse._hub.subscriber_count

    with open_stream(server, key, ["system:global"]):
        assert sse._hub is not None
    assert subscribers_settle_at(0) == 0

    def scraped_subscribers() -> float | None:
        exposition = httpx.get(f"{server}/metrics").text
        return metric_value(exposition, "sse_subscribers")

    with (
        open_stream(server, key, [user_channel(end_user)]),
        open_stream(server, key, ["system:global"]),
    ):
        assert sse._hub.subscriber_count == 2
        assert scraped_subscribers() == 2.0  # as /metrics shows it
    assert subscribers_settle_at(0) == 0
    assert scraped_subscribers() == 0.0


def test_the_stream_under_a_plain_wsgi_server_is_a_501_saying_to_run_under_asgi(client) -> None:
    # Django's own handler (what runserver serves) never sees the stream under ASGI.
    response = client.get("/v1/stream", {"user_id": "anyone"})
    assert response.status_code == 501
    assert response.json()["error"] == "not_implemented"
    assert "ASGI" in response.json()["message"]


# --- Who may keep a stream open ----------------------------------------------------------------


def test_a_revoked_keys_stream_ends(server, tenant, end_user, settings) -> None:
    settings.API_KEY_CACHE_SECONDS = 1
    settings.SSE_HEARTBEAT_SECONDS = 0.5  # the client hears the stream is alive until it ends
    api_key, raw = accounts.api_key_create(tenant=tenant)
    with open_stream(server, raw, [user_channel(end_user)]) as stream:
        started = time.monotonic()
        ApiKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())
        stream.rest()  # returns when the server ends the stream
        assert time.monotonic() - started < 8
    # And it cannot come back (once the key cache of API_KEY_CACHE_SECONDS has let it go).
    wait_for(
        lambda: refusal(server, raw, channels=user_channel(end_user)).status_code == 401,
        timeout=5,
        what="the revoked key to be refused",
    )


def test_a_tenant_may_keep_at_most_sse_max_streams_per_tenant_open(
    server, key, other_key, end_user, other_tenant, settings
) -> None:
    settings.SSE_MAX_STREAMS_PER_TENANT = 2
    channels = [user_channel(end_user)]
    with open_stream(server, key, channels), open_stream(server, key, channels):
        refused = refusal(server, key, channels=",".join(channels))
        assert refused.status_code == 429 and refused.json()["error"] == "too_many_streams"
        # Another tenant is not counted against this one.
        with open_stream(server, other_key, [f"tenant:{other_tenant.id}:shared"]):
            pass
    # Closed streams leave room again.
    wait_for(lambda: _opens(server, key, channels), what="a stream to be admitted again")


def _opens(server: str, key: str, channels: list[str]) -> bool:
    try:
        with open_stream(server, key, channels):
            return True
    except AssertionError:
        return False


def test_a_stream_may_follow_at_most_sse_max_channels_per_stream(
    server, key, end_user, settings
) -> None:
    settings.SSE_MAX_CHANNELS_PER_STREAM = 2
    channels = [user_channel(end_user), "topic:a:updates", "topic:b:updates"]
    refused = refusal(server, key, channels=",".join(channels))
    assert refused.status_code == 429 and "channels" in refused.json()["fields"]
