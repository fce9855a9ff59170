"""`GET /v1/stream`: Server-Sent Events over the event channels, resumable with Last-Event-ID.

    GET /v1/stream?channels=user:<id>:memories,topic:news:updates&types=memory.created
    Authorization: Bearer <key>            Last-Event-ID: <stream id>  (or ?last_event_id=)

Each event is `id: <stream id>`, `event: <event_type>`, `data: <the event as JSON, with "id">`.
The body starts with the comment `: subscribed`; every event committed after the client read it is
delivered. Comments `: heartbeat` keep an idle connection open. Two events end a stream early:
`overflow` (the client fell SSE_CLIENT_BUFFER events behind; reconnect with the id it names) and
`stream-reset` (the Last-Event-ID is older than the oldest retained entry; fetch the state with
`GET /v1/sync`, then the live events follow).

Lazy mode, `&batch_ms=<1..60000>`: events are gathered for that long from the first one, then sent
as one `event: batch` frame, `data: {"events": [...]}` (each with its "id"), whose `id:` is the
last gathered event's stream id, so Last-Event-ID resumes after the whole batch. Within a batch a
memory's events (created, updated, closed, deleted) coalesce to its latest one, which carries its
state (a deletion is kept: it is the latest); other events pass through in order.

    stream_app(...)     the ASGI app: authorize, wait for the hub, send the stream
    Hub                 one per process: the only reader of `memory:events`, fans entries out
    event_stream(...)   one client's body: replay after Last-Event-ID, then live, with heartbeats

Every channel is heard only inside the tenant that produced the event (topic names are chosen by
clients, so two tenants may share one); only events without a tenant reach every `system:global`.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.http import QueryDict
from redis.exceptions import RedisError, ResponseError
from rest_framework import exceptions

from memories import selectors
from memories.access import Access
from memories.auth import TenantPrincipal, api_key_authenticate
from memories.errors import Forbidden, NotFound
from memories.events.schema import EVENT_TYPES, system_channel, tenant_channel, user_channel
from memories.events.stream import (
    INDEXED_SINCE_KEY,
    STREAM_KEY,
    TENANT_TRIMMED_KEY,
    stream_id_order,
    tenant_stream_key,
)
from memories.events.stream_guard import StreamGuard, TooManyStreams
from memories.metrics import SSE_SUBSCRIBERS
from memories.models import Tenant

logger = logging.getLogger(__name__)

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

SYSTEM_CHANNEL = system_channel()
SUBSCRIBED = b": subscribed\n\n"
HEARTBEAT = b": heartbeat\n\n"
READ_BLOCK_MS = 5_000
READ_BATCH = 500
REPLAY_PAGE = 500
HUB_READY_TIMEOUT_SECONDS = 5.0
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
_USER = re.compile(r"user:([^:]+):memories")
_TENANT = re.compile(r"tenant:([^:]+):shared")
_TOPIC = re.compile(r"topic:(.{1,200}):updates")
BATCH_MS_MAX = 60_000
# A batch is sent early once it holds this many entries (a long replay, a burst of many
# memories), so no frame grows without bound.
BATCH_MAX_EVENTS = 500
# The events that carry one memory's whole state: a batch keeps a memory's latest of them.
MEMORY_STATE_EVENTS = frozenset(
    {"memory.created", "memory.updated", "memory.closed", "memory.deleted"}
)

# redis-py types replies for any client: `bytes | str`, and RESP3's shapes too. The hub's client
# decodes responses and speaks RESP2, so its replies are cast to the shapes it actually returns.
_Entries = list[tuple[str, dict[str, str]]]


# --- Who may hear what ---------------------------------------------------------------------------


class StreamRefused(Exception):
    """A stream request that is not served, answered in the API's error JSON shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        missing_grant: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.missing_grant = missing_grant

    async def send_to(self, send: ASGISend) -> None:
        """Answer with the API's error JSON (the bytes JsonResponse would have written)."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["fields"] = {self.field: [self.message]}
        if self.missing_grant:
            body["missing_grant"] = self.missing_grant
        content = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            *_security_headers(),
        ]
        if self.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="memory"'))
        elif self.status == 405:
            headers.append((b"allow", b"GET"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@dataclass(frozen=True)
class StreamRequest:
    """What an authorized client asked for: channels in canonical form, types (None: all)."""

    tenant_id: str
    api_key_id: str
    channels: tuple[str, ...]
    types: frozenset[str] | None
    last_event_id: str | None
    batch_ms: int | None = None  # lazy mode: coalesce over this window


def route_key(tenant_id: str, channel: str) -> str:
    """The hub's key for a channel as heard by one tenant."""
    if channel == SYSTEM_CHANNEL and not tenant_id:
        return SYSTEM_CHANNEL
    return f"{tenant_id}/{channel}"


# Every event of a tenant, whatever its channels: the staff dashboard's feed (never a client's
# channel: `_channel_canonical` refuses the name).
TENANT_WIDE = "*"


def event_route_keys(event: dict[str, Any]) -> set[str]:
    tenant_id = event["source"]["tenant_id"]
    keys = {route_key(tenant_id, channel) for channel in event.get("channels") or ()}
    if tenant_id:
        keys.add(route_key(tenant_id, TENANT_WIDE))
    return keys


def stream_request_authorize(
    *, authorization: str, query: QueryDict, last_event_id: str | None
) -> StreamRequest:
    """Authenticate the key and check every parameter; blocking (it reads the database).

    `authorization` is the Authorization header ("" when absent), `query` the query string and
    `last_event_id` the Last-Event-ID header (None when absent; `?last_event_id=` stands in).
    Raises StreamRefused: 401 without a valid key; 400 naming `channels`, `types`, `batch_ms` or
    `Last-Event-ID` when one is missing or malformed; 403 naming `channels` for a channel of
    another tenant (a user who is not the caller's is refused whether or not they exist elsewhere).
    """
    # Django's request cycle, done by hand: this runs in the shared thread pool, where the
    # connection is kept for the next call, rather than in a thread bound to this request.
    close_old_connections()
    try:
        principal = _authenticate(authorization)
        tenant = principal.tenant
        channels = _channels_authorize(
            tenant, query.get("channels", ""), access=Access.of(principal)
        )
    finally:
        close_old_connections()
    return StreamRequest(
        tenant_id=str(tenant.id),
        api_key_id=str(principal.api_key.pk),
        channels=channels,
        types=_types_parse(query.get("types", "")),
        last_event_id=_last_event_id_parse(last_event_id or query.get("last_event_id")),
        batch_ms=_batch_ms_parse(query.get("batch_ms")),
    )


def _authenticate(authorization: str) -> TenantPrincipal:
    try:
        principal = api_key_authenticate(authorization)
    except exceptions.AuthenticationFailed as exc:
        raise StreamRefused(401, "authentication_failed", str(exc.detail)) from exc
    if principal is None:
        raise StreamRefused(401, "not_authenticated", "Authentication credentials were not given.")
    return principal


def _channels_authorize(tenant: Tenant, raw: str, *, access: Access) -> tuple[str, ...]:
    """The channels asked for, canonical; another tenant's (or no one's) user or tenant channel
    is 403, as is a user or topic channel the key is not granted (with `missing_grant`). The
    tenant's shared channel and `system:global` are every role's."""
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise StreamRefused(
            400, "invalid_request", "Name at least one channel: channels=a,b.", "channels"
        )
    if len(set(names)) > settings.SSE_MAX_CHANNELS_PER_STREAM:
        cap = settings.SSE_MAX_CHANNELS_PER_STREAM
        raise StreamRefused(
            429, "too_many_channels", f"A stream may follow {cap} channels at most.", "channels"
        )
    channels: list[str] = []
    for name in names:
        channel = _channel_canonical(name)
        if channel.startswith("user:"):
            try:
                user = selectors.end_user_get(tenant=tenant, user_id=channel.split(":")[1])
            except NotFound as exc:
                raise _forbidden(name) from exc
            _granted(name, access.user, user.id, created_by_key_id=user.created_by_key_id)
        elif channel.startswith("tenant:") and channel != tenant_channel(tenant.id):
            raise _forbidden(name)
        elif channel.startswith("topic:"):
            _granted(name, access.topic, channel.removeprefix("topic:").removesuffix(":updates"))
        if channel not in channels:
            channels.append(channel)
    return tuple(channels)


def _channel_canonical(name: str) -> str:
    # Ids are compared as text with the events' channels, so they are normalised here.
    for pattern, build in ((_USER, user_channel), (_TENANT, tenant_channel)):
        match = pattern.fullmatch(name)
        if match:
            try:
                return build(uuid.UUID(match.group(1)))
            except ValueError:
                raise _malformed(name) from None
    if _TOPIC.fullmatch(name) or name == SYSTEM_CHANNEL:
        return name
    raise _malformed(name)


def _malformed(name: str) -> StreamRefused:
    return StreamRefused(
        400,
        "invalid_request",
        f"Unknown channel {name!r}: use user:<user_id>:memories, tenant:<tenant_id>:shared, "
        "topic:<topic>:updates or system:global.",
        "channels",
    )


def _granted(name: str, check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        check(*args, **kwargs)
    except Forbidden as exc:
        raise StreamRefused(
            403, "forbidden", exc.message, "channels", missing_grant=exc.details["missing_grant"]
        ) from exc


def _forbidden(name: str) -> StreamRefused:
    return StreamRefused(403, "forbidden", f"Channel {name!r} is not one of yours.", "channels")


def _types_parse(raw: str) -> frozenset[str] | None:
    types = frozenset(name.strip() for name in raw.split(",") if name.strip())
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise StreamRefused(
            400,
            "invalid_request",
            f"Unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}.",
            "types",
        )
    return types or None


def _batch_ms_parse(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    value = raw.strip()
    if not (
        value.isascii() and value.isdigit() and len(value) <= 6 and 1 <= int(value) <= BATCH_MS_MAX
    ):
        raise StreamRefused(
            400, "invalid_request", f"batch_ms must be an integer from 1 to {BATCH_MS_MAX}.",
            "batch_ms",
        )  # fmt: skip
    return int(value)


def _last_event_id_parse(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    if not STREAM_ID.fullmatch(raw.strip()):
        raise StreamRefused(
            400, "invalid_request", "Last-Event-ID must be a stream id like 1700000000000-0.",
            "Last-Event-ID",
        )  # fmt: skip
    return raw.strip()


# --- The hub -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One event, encoded once for every subscriber that gets it."""

    id: str
    order: tuple[int, int]
    data: bytes
    event: dict[str, Any]  # as read (without "id"), for a lazy stream's batches; never changed


def frame_for(entry_id: str, event: dict[str, Any]) -> Frame:
    # Compact JSON never contains a newline, so the event fits on one `data:` line.
    data = json.dumps({"id": entry_id, **event}, separators=(",", ":"))
    text = f"id: {entry_id}\nevent: {event['event_type']}\ndata: {data}\n\n"
    return Frame(id=entry_id, order=stream_id_order(entry_id), data=text.encode(), event=event)


class Batch:
    """A lazy stream's events of one window, coalesced per memory (see the module's opening)."""

    __slots__ = ("entries", "last_id")

    def __init__(self) -> None:
        # Insertion order is send order; a memory's newer event moves it to the end, so the
        # batch stays in stream order of what it keeps.
        self.entries: dict[Any, Frame] = {}
        self.last_id: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, frame: Frame) -> None:
        event = frame.event
        memory = event.get("memory")
        if event.get("event_type") in MEMORY_STATE_EVENTS and isinstance(memory, dict):
            key: Any = ("memory", memory.get("id"))
            self.entries.pop(key, None)
        else:
            key = frame.id
        self.entries[key] = frame
        self.last_id = frame.id

    def take(self) -> tuple[str, bytes]:
        """The batch's frame and its id (the last gathered event's); the batch is empty after."""
        assert self.last_id is not None, "an empty batch is never sent"
        events = [{"id": frame.id, **frame.event} for frame in self.entries.values()]
        data = json.dumps({"events": events}, separators=(",", ":"))
        last_id = self.last_id
        self.entries, self.last_id = {}, None
        return last_id, f"id: {last_id}\nevent: batch\ndata: {data}\n\n".encode()


class Subscriber:
    """One client's place in the hub: its route keys, its type filter and a bounded queue.

    The hub never waits for a subscriber: when the queue is full the subscriber is marked
    overflowed and taken out of the hub, so it receives nothing more and its stream must end.
    `start_id` is the hub's position when it joined: every later entry it wants is queued.
    `None` in the queue is not an entry: the stream's heartbeat timer asks for a heartbeat.
    """

    __slots__ = ("keys", "types", "queue", "overflowed", "start_id", "registered")

    def __init__(
        self, keys: frozenset[str], types: frozenset[str] | None, buffer: int, start_id: str
    ) -> None:
        self.keys = keys
        self.types = types
        # One slot more than the buffer: a heartbeat request may sit in the queue, and it must
        # not make the subscriber overflow sooner.
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=max(buffer, 1) + 1)
        self.overflowed = False
        self.start_id = start_id
        self.registered = True  # until the hub lets go of it (overflow or disconnect)

    def wants(self, event: dict[str, Any]) -> bool:
        if self.types is not None and event["event_type"] not in self.types:
            return False
        return not self.keys.isdisjoint(event_route_keys(event))


class Hub:
    """The one reader of the event stream in this process (and event loop).

    A single task does XREAD BLOCK on `memory:events` from the entry that was newest when it
    started, and hands each entry to the subscribers of its channels, in stream order. A Redis
    error is logged and retried with backoff from the same position, so no entry is skipped.
    """

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.get_running_loop()
        # The socket timeout outlives a blocked XREAD: it only fires on a dead connection.
        self.redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=READ_BLOCK_MS / 1000 + 10
        )
        self.position: str | None = None
        self._routes: dict[str, set[Subscriber]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def subscriber_count(self) -> int:
        return len(set().union(*self._routes.values()))

    async def wait_ready(self, timeout: float) -> None:
        """Start reading if not yet; return once the hub knows its position (TimeoutError)."""
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._read_forever(), name="sse-hub")
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def subscribe(
        self, *, keys: Iterable[str], types: frozenset[str] | None, buffer: int
    ) -> Subscriber:
        """Register a subscriber (the hub must be ready); it gets every entry read from now on."""
        assert self.position is not None, "wait_ready() first"
        subscriber = Subscriber(frozenset(keys), types, buffer, self.position)
        for key in subscriber.keys:
            self._routes.setdefault(key, set()).add(subscriber)
        SSE_SUBSCRIBERS.inc()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Take the subscriber out of the hub; a second call (overflow, then close) is a no-op."""
        if not subscriber.registered:
            return
        subscriber.registered = False
        SSE_SUBSCRIBERS.dec()
        for key in subscriber.keys:
            subscribers = self._routes.get(key)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._routes[key]

    async def trimmed_past(self, tenant_id: str, last_event_id: str) -> bool:
        """Whether entries of the tenant after `last_event_id` may have been trimmed away (or
        predate per-tenant streams), so replay would skip some."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(INDEXED_SINCE_KEY)
            pipe.hget(TENANT_TRIMMED_KEY, tenant_stream_key(tenant_id))
            indexed, trimmed = await pipe.execute()
        if indexed is None:
            return False  # nothing was ever published: there is nothing to miss
        boundary = max(stream_id_order(indexed), stream_id_order(trimmed or "0-0"))
        return stream_id_order(last_event_id) < boundary

    async def replay(
        self, subscriber: Subscriber, *, tenant_id: str, after: str, system: bool = False
    ) -> AsyncIterator[Frame]:
        """Stored entries after `after` (exclusive) up to the newest that it wants, in order:
        read from the tenant's own stream (and the system one, for `system:global`), never
        another tenant's."""
        entries = self._pages(tenant_stream_key(tenant_id), after)
        if system:  # few entries: merged in id order with the tenant's, in memory
            stored = [
                await _drain(entries),
                await _drain(self._pages(tenant_stream_key(""), after)),
            ]
            entries = _iterate(heapq.merge(*stored, key=_entry_order))
        async for entry_id, fields in entries:
            event = json.loads(fields["event"])
            if subscriber.wants(event):
                yield frame_for(entry_id, event)

    async def _pages(self, key: str, after: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        start = f"({after}"
        while True:
            entries = cast(
                _Entries, await self.redis.xrange(key, min=start, max="+", count=REPLAY_PAGE)
            )
            for entry in entries:
                yield entry
            if len(entries) < REPLAY_PAGE:
                return
            start = f"({entries[-1][0]}"

    async def _read_forever(self) -> None:
        backoff = 0.1
        try:
            while True:
                try:
                    if self.position is None:
                        self.position = await self._newest_id()
                        self._ready.set()
                    reply = cast(
                        list[list[Any]],  # [[stream, entries]]
                        await self.redis.xread(
                            {STREAM_KEY: self.position}, count=READ_BATCH, block=READ_BLOCK_MS
                        ),
                    )
                except Exception:
                    logger.exception("event hub: reading %s failed; retrying", STREAM_KEY)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        self._dispatch(entry_id, fields)
                # Let the subscribers just woken send first: issuing the next XREAD costs a
                # write that wakes Redis, and on a busy machine that write can hand the CPU away
                # before any of them has sent a byte.
                await asyncio.sleep(0)
        finally:
            await self.redis.aclose()

    async def _newest_id(self) -> str:
        try:
            return (await self.redis.xinfo_stream(STREAM_KEY))["last-generated-id"]
        except ResponseError:
            return "0-0"  # no stream yet: everything that arrives is new

    def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        # Runs without awaiting, so no subscriber joins halfway through an entry.
        self.position = entry_id
        if not self._routes:
            return
        try:
            event = json.loads(fields["event"])
            targets: set[Subscriber] = set()
            for key in event_route_keys(event):
                targets.update(self._routes.get(key, ()))
            if not targets:
                return
            frame = frame_for(entry_id, event)
        except (KeyError, TypeError, ValueError):
            logger.exception("event hub: entry %s is not an event; not delivered", entry_id)
            return
        for subscriber in targets:
            if subscriber.types is not None and event["event_type"] not in subscriber.types:
                continue
            try:
                subscriber.queue.put_nowait(frame)
            except asyncio.QueueFull:
                subscriber.overflowed = True
                self.unsubscribe(subscriber)


_hub: Hub | None = None


_guard: StreamGuard | None = None


def get_guard(hub: Hub) -> StreamGuard:
    """The process's stream guard, on the hub's Redis client (bound to the same loop)."""
    global _guard
    if _guard is None or _guard.redis is not hub.redis:
        _guard = StreamGuard(hub.redis)
    return _guard


def get_hub() -> Hub:
    """The process's hub, created in (and bound to) the running event loop on first use."""
    global _hub
    if _hub is None or _hub.loop is not asyncio.get_running_loop():
        _hub = Hub(settings.REDIS_URL)
    return _hub


# --- One client's stream -------------------------------------------------------------------------


def _control_frame(event: str, frame_id: str, **data: Any) -> bytes:
    return f"id: {frame_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def event_stream(
    hub: Hub, wanted: StreamRequest, *, buffer: int, heartbeat: float
) -> AsyncGenerator[bytes, None]:
    """One client's SSE body, from `: subscribed` until the client leaves or falls behind.

    With a Last-Event-ID every wanted entry after it is delivered once, in order, with no gap:
    the subscriber joins the hub before the stored entries are read, and live entries at or before
    the last one delivered are dropped. If the stream was trimmed past that id, `stream-reset` is
    sent instead and only live entries follow. A subscriber whose queue overflowed gets what was
    queued, then `overflow` naming the last id delivered, and the stream ends. The subscriber
    leaves the hub however the stream ends (disconnect, overflow, Redis error).
    """
    keys = {route_key(wanted.tenant_id, channel) for channel in wanted.channels}
    if SYSTEM_CHANNEL in wanted.channels:
        keys.add(SYSTEM_CHANNEL)
    subscriber = hub.subscribe(keys=keys, types=wanted.types, buffer=buffer)
    last_id = subscriber.start_id
    # Lazy mode: frames gathered into `batch` until `window` seconds after its first one.
    window = wanted.batch_ms / 1000 if wanted.batch_ms else None
    batch = Batch()
    try:
        yield SUBSCRIBED
        if wanted.last_event_id is not None:
            if await hub.trimmed_past(wanted.tenant_id, wanted.last_event_id):
                yield _control_frame(
                    "stream-reset",
                    last_id,
                    last_event_id=wanted.last_event_id,
                    message="Events after your Last-Event-ID were trimmed from the stream. "
                    "Fetch the current state with GET /v1/sync; live events continue here.",
                )
            else:
                last_id = wanted.last_event_id
                replayed = hub.replay(
                    subscriber,
                    tenant_id=wanted.tenant_id,
                    after=last_id,
                    system=SYSTEM_CHANNEL in wanted.channels,
                )
                async for stored in replayed:
                    if window is None:
                        yield stored.data
                        last_id = stored.id
                        continue
                    batch.add(stored)  # what was missed, coalesced too
                    if len(batch) >= BATCH_MAX_EVENTS:
                        last_id, data = batch.take()
                        yield data
                if batch:
                    last_id, data = batch.take()
                    yield data
        last_order = stream_id_order(last_id)
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        timer: asyncio.TimerHandle  # set below, then re-armed by each call
        # Lazy mode: the pending get (kept across a window's end, so no frame is lost to a
        # cancelled get) and when the batch in progress is due.
        getter: asyncio.Future[Frame | None] | None = None
        due: float | None = None

        def heartbeat_if_quiet() -> None:
            # One timer per quiet period, not one per event (a timeout around every wait cost
            # more than the rest of the hand-over): it queues a heartbeat request when nothing was
            # sent for `heartbeat` seconds, else waits for the rest of the period. A timer that
            # fires early just waits again. Only an empty queue gets one: else data is coming.
            nonlocal timer
            next_at = quiet_since + heartbeat
            if loop.time() >= next_at:
                if subscriber.queue.empty():
                    subscriber.queue.put_nowait(None)
                next_at = loop.time() + heartbeat
            timer = loop.call_at(next_at, heartbeat_if_quiet)

        timer = loop.call_at(quiet_since + heartbeat, heartbeat_if_quiet)
        try:
            while True:
                overflowed = subscriber.overflowed and subscriber.queue.empty()
                if overflowed and (getter is None or not getter.done()):
                    if getter is not None:  # nothing more can come: the hub let go of us
                        getter.cancel()
                        getter = None
                    if batch:
                        last_id, data = batch.take()
                        yield data
                    yield _control_frame(
                        "overflow",
                        last_id,
                        last_event_id=last_id,
                        message=f"More than {buffer} events behind. Reconnect with "
                        f"Last-Event-ID: {last_id} to continue without a gap.",
                    )
                    return
                if due is None:
                    if getter is not None:  # left waiting when the last window ended
                        frame, getter = await getter, None
                    else:
                        frame = await subscriber.queue.get()
                else:
                    if getter is None:
                        getter = asyncio.ensure_future(subscriber.queue.get())
                    done, _ = await asyncio.wait((getter,), timeout=max(due - loop.time(), 0))
                    if not done:  # the window is over: send what it gathered
                        last_id, data = batch.take()
                        due = None
                        yield data
                        quiet_since = loop.time()
                        continue
                    frame, getter = getter.result(), None
                if frame is None:
                    if due is None:  # a batch in progress will be sent soon enough
                        yield HEARTBEAT
                elif frame.order <= last_order:
                    continue  # already sent by the replay
                elif window is None:
                    yield frame.data
                    last_id, last_order = frame.id, frame.order
                else:
                    batch.add(frame)
                    last_order = frame.order
                    if due is None:
                        due = loop.time() + window
                    if len(batch) >= BATCH_MAX_EVENTS:
                        last_id, data = batch.take()
                        due = None
                        yield data
                quiet_since = loop.time()
        finally:
            timer.cancel()
            if getter is not None:
                getter.cancel()
    except RedisError:
        # Ending the stream is safe: the client reconnects with the last id it received.
        logger.exception("event stream: Redis failed while catching up; closing the stream")
    finally:
        hub.unsubscribe(subscriber)


# --- The ASGI endpoint ---------------------------------------------------------------------------


def _security_headers() -> list[tuple[bytes, bytes]]:
    # This path is served outside Django's middleware, so it adds the headers that
    # SecurityMiddleware adds to every other response, from the same settings. (Not HSTS: the
    # settings leave SECURE_HSTS_SECONDS at 0, so Django sends none either.)
    headers = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    policy = settings.SECURE_REFERRER_POLICY
    if policy:
        values = policy.split(",") if isinstance(policy, str) else policy
        headers.append((b"referrer-policy", ",".join(v.strip() for v in values).encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append(
            (b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode())
        )
    return headers


async def stream_app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    """`GET /v1/stream` as a plain ASGI app (see the module docstring), mounted in front of Django.

    Django's handler costs tens of microseconds per chunk sent and keeps a thread for each open
    request; here the key and channels are checked once, in the shared thread pool, and then an
    open stream is only a task waiting on its queue. Refusals have the API's error shape.
    """
    try:
        if scope["method"] != "GET":
            raise StreamRefused(405, "method_not_allowed", f"Method {scope['method']} not allowed.")
        headers = dict(scope["headers"])  # ASGI header names are lower case
        wanted = await sync_to_async(stream_request_authorize, thread_sensitive=False)(
            authorization=headers.get(b"authorization", b"").decode(errors="replace"),
            # As Django does: percent escapes decode as UTF-8, and a bad byte never raises.
            query=QueryDict(scope["query_string"].decode("latin-1")),
            last_event_id=_header_text(headers.get(b"last-event-id")),
        )
        hub = get_hub()
        try:
            await hub.wait_ready(timeout=HUB_READY_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise StreamRefused(503, "unavailable", "The event stream is unavailable.") from exc
        guard = get_guard(hub)
        try:
            lease, key_unusable = await guard.admit(
                tenant_id=wanted.tenant_id, api_key_id=wanted.api_key_id
            )
        except TooManyStreams as exc:
            cap = settings.SSE_MAX_STREAMS_PER_TENANT
            message = f"This tenant has {cap} event streams open; close one first."
            raise StreamRefused(429, "too_many_streams", message) from exc
    except StreamRefused as refused:
        logger.warning("event stream refused: %s %s", refused.status, refused.message)
        await refused.send_to(send)
        return
    except Exception:
        # What Django's handler500 (api_errors.server_error_view) answers on the other paths.
        logger.exception("event stream: the request could not be checked")
        failed = StreamRefused(500, "server_error", "Internal error; it has been logged.")
        await failed.send_to(send)
        return
    try:
        await serve_event_stream(hub, wanted, receive, send, must_end=key_unusable)
    finally:
        await guard.release(lease)


async def serve_event_stream(
    hub: Hub,
    wanted: StreamRequest,
    receive: ASGIReceive,
    send: ASGISend,
    *,
    must_end: asyncio.Event,
) -> None:
    """Send an authorized stream's response until the body ends, the client leaves, or
    `must_end` is set (its credentials stopped being good: the response is then ended properly).
    Shared by `/v1/stream` and the staff dashboard's stream."""
    # Settings are read per connection, so a changed buffer or heartbeat applies to new clients.
    body = event_stream(
        hub, wanted, buffer=settings.SSE_CLIENT_BUFFER, heartbeat=settings.SSE_HEARTBEAT_SECONDS
    )
    start_headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        *_security_headers(),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": start_headers})
    # The stream ends when the body does or when `receive` reports the disconnect, whichever
    # comes first: uvicorn silently drops what is sent to a client that has gone.
    sending = asyncio.ensure_future(_send_all(body, send))
    listening = asyncio.ensure_future(_until_disconnect(receive))
    # A key revoked, expired or deleted while the stream is open ends it (within a round).
    revoked = asyncio.ensure_future(must_end.wait())
    ended_by_key = False
    try:
        done, _ = await asyncio.wait(
            (sending, listening, revoked), return_when=asyncio.FIRST_COMPLETED
        )
        ended_by_key = revoked in done and sending not in done and listening not in done
    finally:
        sending.cancel()
        listening.cancel()
        revoked.cancel()
        await asyncio.gather(sending, listening, revoked, return_exceptions=True)
        await body.aclose()  # leaves the hub, even when cancelled in the middle of a send
    if ended_by_key:  # the client is still there: end the response properly
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if not sending.cancelled():
        sending.result()  # re-raises what broke the stream, for the server to log


def _header_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _send_all(body: AsyncIterator[bytes], send: ASGISend) -> None:
    async for chunk in body:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: ASGIReceive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a request body, which a GET should not have: ignored


async def _drain(
    entries: AsyncIterator[tuple[str, dict[str, str]]],
) -> list[tuple[str, dict[str, str]]]:
    return [entry async for entry in entries]


async def _iterate(
    entries: Iterable[tuple[str, dict[str, str]]],
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    for entry in entries:
        yield entry


def _entry_order(entry: tuple[str, dict[str, str]]) -> tuple[int, int]:
    return stream_id_order(entry[0])
