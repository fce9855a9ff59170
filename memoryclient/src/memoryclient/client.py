"""`MemoryClient`: the synchronous client, a thin transport over the calls in `_core`."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from memoryclient import _core
from memoryclient._core import Call, Json, Jsons, Page
from memoryclient.errors import MemoryClientError, Unreachable

logger = logging.getLogger("memoryclient")
T = TypeVar("T")


class MemoryClient:
    """The memory service over HTTP. `429` and `503` are retried after `Retry-After`, at most
    `max_retries` times; every other refusal raises its `MemoryClientError` subclass, and a
    connection that fails raises `Unreachable`.

    `stream_read_timeout` bounds the silence a subscription accepts (the server sends a heartbeat
    every 15 s) before it reconnects."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        agent_id: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 3,
        stream_read_timeout: float = 45.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.agent_id = agent_id
        self.timeout = timeout
        self.max_retries = max_retries
        self.stream_read_timeout = stream_read_timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_core.client_headers(api_key, agent_id),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the transport ---

    def _run(self, call: Call[T]) -> T:
        timeout = httpx.Timeout(self.timeout + call.wait) if call.wait else None
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    headers=call.headers,
                    timeout=timeout or httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                raise Unreachable(f"{call.method} {call.path}: {exc!r}", status=0) from exc
            if _core.should_retry(response, attempt, self.max_retries):
                time.sleep(_core.retry_after(response, attempt))
                attempt += 1
                continue
            _core.raise_for(response)
            return call.parse(response)

    def _pages(self, page: Callable[[str | None], Call[Page]]) -> Iterator[Json]:
        cursor: str | None = None
        while True:
            current = self._run(page(cursor))
            yield from current.results
            if not current.next_cursor:
                return
            cursor = current.next_cursor

    # --- users ---

    def create_user(
        self, external_id: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> str:
        """A new user of this tenant; returns its id."""
        return self._run(_core.create_user(external_id, metadata))

    def get_user(self, user_id: str) -> Json:
        return self._run(_core.get_user(user_id))

    def find_user(self, external_id: str) -> Json | None:
        """The user with this external id, or None."""
        return self._run(_core.find_user(external_id))

    def delete_user(self, user_id: str) -> Json:
        """Erase the user (a job: the request status; poll it with `status`)."""
        return self._run(_core.delete_user(user_id))

    # --- memory jobs ---

    def add(
        self,
        user_id: str,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Json:
        """Submit a memory job (`metadata`, `agent_id`, `session_id`, `priority`, `infer` as
        fields); with `wait` (seconds, at most 20) the answer is the finished request when it ends
        in time. Returns the request status."""
        return self._run(
            _core.add(user_id, messages, wait=wait, idempotency_key=idempotency_key, fields=fields)
        )

    def status(self, request_id: str, *, wait: float | None = None) -> Json:
        return self._run(_core.status(request_id, wait=wait))

    # --- memories ---

    def write(
        self,
        user_id: str | None,
        content: str,
        *,
        type: str = "fact",
        scope: str = "user",
        topic: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        merge: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Json:
        """A direct write (no model): the new memory. `user_id` is None for shared scopes."""
        return self._run(
            _core.write(
                user_id,
                content,
                type=type,
                scope=scope,
                topic=topic,
                metadata=metadata,
                merge=merge,
                idempotency_key=idempotency_key,
                fields=fields,
            )
        )

    def get(self, memory_id: str) -> Json:
        return self._run(_core.get(memory_id))

    def list(self, user_id: str, **filters: Any) -> Iterator[Json]:
        """Every memory of the user's view that matches, page after page (`limit` is the page
        size; `include_shared`, `topics`, `type`, `metadata`, `as_of`, ... as the API has them)."""
        return self._pages(lambda cursor: _core.list_page(user_id, filters, cursor))

    def search(self, user_id: str, query: str, **options: Any) -> Jsons:
        return self._run(_core.search(user_id, query, options))

    def update(
        self,
        memory_id: str,
        *,
        content: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        if_version: int | None = None,
        base_clock: Mapping[str, int] | None = None,
        merge: bool = False,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Json:
        """Correct a memory; `if_version` refuses with PreconditionFailed when it moved on."""
        body = _core.update_body(
            content=content, metadata=metadata, base_clock=base_clock, merge=merge, fields=fields
        )
        return self._run(
            _core.patch(memory_id, body, if_version=if_version, idempotency_key=idempotency_key)
        )

    def increment(self, memory_id: str, by: int = 1, *, idempotency_key: str | None = None) -> Json:
        """Add `by` (negative: subtract) to a counter."""
        return self._run(_core.patch(memory_id, {"increment": by}, idempotency_key=idempotency_key))

    def list_add(
        self, memory_id: str, items: Iterable[Any], *, idempotency_key: str | None = None
    ) -> Json:
        return self._run(
            _core.patch(memory_id, {"add": list(items)}, idempotency_key=idempotency_key)
        )

    def list_remove(
        self, memory_id: str, items: Iterable[Any], *, idempotency_key: str | None = None
    ) -> Json:
        return self._run(
            _core.patch(memory_id, {"remove": list(items)}, idempotency_key=idempotency_key)
        )

    def delete(self, memory_id: str, *, idempotency_key: str | None = None) -> None:
        """Forget the memory (its content is erased everywhere)."""
        self._run(_core.delete(memory_id, idempotency_key=idempotency_key))

    def history(self, memory_id: str) -> Jsons:
        """Every change of the memory, oldest first (all pages)."""
        return [*self._pages(lambda cursor: _core.history_page(memory_id, cursor))]

    def batch(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        run_async: bool = False,
        idempotency_key: str | None = None,
    ) -> Json:
        """Bulk writes without the model: a result per item (or, `run_async`, a request id)."""
        return self._run(_core.batch(items, run_async=run_async, idempotency_key=idempotency_key))

    # --- conflicts ---

    def conflicts(self, memory_id: str | None = None, *, status: str | None = "open") -> Jsons:
        return [*self._pages(lambda c: _core.conflicts_page(memory_id, status, c))]

    def resolve(self, conflict_id: str, **choice: Any) -> Json:
        """End a conflict: `choose="current"|"incoming"`, or `content="..."`."""
        return self._run(_core.resolve(conflict_id, choice))

    # --- events, sync ---

    def whoami(self) -> Json:
        return self._run(_core.whoami())

    def events(self, **filters: Any) -> Jsons:
        """Stored events (`user_id`, `session_id`, `type`, `since`, `until`, `after`, `limit`)."""
        return self._run(_core.events(filters))

    def sync(
        self,
        user_id: str | None = None,
        *,
        since: str | None = None,
        scope: str | None = None,
        topic: str | None = None,
        include_shared: bool | None = None,
        topics: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> Json:
        """One page of changes since the cursor: `{"changes", "next_cursor", "has_more"}`."""
        query = _core.sync_query(
            user_id, scope=scope, topic=topic, include_shared=include_shared, topics=topics
        )
        return self._run(_core.sync(query, since=since, limit=limit))

    def sync_digest(
        self,
        user_id: str | None = None,
        *,
        scope: str | None = None,
        topic: str | None = None,
        include_shared: bool | None = None,
        topics: Sequence[str] | None = None,
    ) -> Json:
        """`{"count", "hash"}` of the live set (see LocalCache.verify)."""
        query = _core.sync_query(
            user_id, scope=scope, topic=topic, include_shared=include_shared, topics=topics
        )
        return self._run(_core.sync_digest(query))

    def _sync_path(self, path: str, *, since: str | None = None) -> Json:
        return self._run(_core.sync_path(path, since=since))

    def subscribe(
        self,
        channels: str | Sequence[str],
        *,
        last_event_id: str | None = None,
        batch_ms: int | None = None,
        types: Sequence[str] | None = None,
    ) -> Subscription:
        """Events of the channels as they happen, reconnecting by itself with Last-Event-ID.

        Iterate it for event dicts (each with its stream `id`). A `stream-reset` event means the
        position was too old: fetch the state with `sync`, live events follow. `close()` ends it
        (from any thread)."""
        state = _core.SubscriptionState(
            [channels] if isinstance(channels, str) else channels,
            last_event_id=last_event_id,
            batch_ms=batch_ms,
            types=types,
        )
        return Subscription(self, state)


class Subscription:
    """An open subscription: an iterator of events; `last_event_id` is where it stands.

    `on_subscribed`, when set, is called each time a connection is established (after the
    server's `: subscribed`): from then on no event is missed."""

    def __init__(self, client: MemoryClient, state: _core.SubscriptionState) -> None:
        self._client = client
        self._state = state
        self._closed = threading.Event()
        self._response: httpx.Response | None = None
        self.on_subscribed: Callable[[], None] | None = None
        self.on_disconnected: Callable[[BaseException | None], None] | None = None

    @property
    def last_event_id(self) -> str | None:
        return self._state.last_event_id

    @property
    def connected(self) -> bool:
        return self._state.subscribed and not self._closed.is_set()

    def close(self) -> None:
        """End the subscription; a thread blocked reading it wakes up and stops."""
        self._closed.set()
        response = self._response
        if response is not None:
            # Closing a socket does not wake a thread blocked in recv on it; shutting it down does.
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Json]:
        state, client = self._state, self._client
        timeout = httpx.Timeout(client.timeout, read=client.stream_read_timeout)
        while not self._closed.is_set():
            params, headers = state.request()
            error: BaseException | None = None
            try:
                with client._http.stream(
                    "GET", "/v1/stream", params=params, headers=headers, timeout=timeout
                ) as response:
                    self._response = response
                    if response.status_code >= 400:
                        response.read()
                        _core.raise_for(response)
                    decoder = _core.SSEDecoder()
                    for line in response.iter_lines():
                        item = decoder.feed(line)
                        if isinstance(item, str):
                            was = state.subscribed
                            state.on_comment(item)
                            if state.subscribed and not was and self.on_subscribed:
                                self.on_subscribed()
                        elif item is not None:
                            yield from state.handle(item)
                            if state.reconnect:
                                break
            except MemoryClientError as exc:
                if _core.fatal(exc) or self._closed.is_set():
                    raise
                error = exc
            except (httpx.TransportError, httpx.StreamError) as exc:
                error = exc
            finally:
                self._response = None
            if self._closed.is_set():
                return
            if self.on_disconnected:
                self.on_disconnected(error)
            delay = state.failed()
            logger.info("subscription: reconnecting in %.1fs (%r)", delay, error)
            if self._closed.wait(delay):
                return
