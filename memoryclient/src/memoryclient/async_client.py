"""`AsyncMemoryClient`: the same methods as `MemoryClient`, awaited; the same calls (`_core`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from memoryclient import _core
from memoryclient._core import Call, Json, Jsons, Page
from memoryclient.errors import MemoryClientError, Unreachable

logger = logging.getLogger("memoryclient")
T = TypeVar("T")


class AsyncMemoryClient:
    """The memory service over HTTP, for asyncio. See `MemoryClient` for the behaviour."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        agent_id: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 3,
        stream_read_timeout: float = 45.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.agent_id = agent_id
        self.timeout = timeout
        self.max_retries = max_retries
        self.stream_read_timeout = stream_read_timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_core.client_headers(api_key, agent_id),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the transport ---

    async def _run(self, call: Call[T]) -> T:
        timeout = httpx.Timeout(self.timeout + call.wait) if call.wait else None
        attempt = 0
        while True:
            try:
                response = await self._http.request(
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
                await asyncio.sleep(_core.retry_after(response, attempt))
                attempt += 1
                continue
            _core.raise_for(response)
            return call.parse(response)

    async def _pages(self, page: Callable[[str | None], Call[Page]]) -> AsyncIterator[Json]:
        cursor: str | None = None
        while True:
            current = await self._run(page(cursor))
            for result in current.results:
                yield result
            if not current.next_cursor:
                return
            cursor = current.next_cursor

    # --- users ---

    async def create_user(
        self, external_id: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> str:
        return await self._run(_core.create_user(external_id, metadata))

    async def get_user(self, user_id: str) -> Json:
        return await self._run(_core.get_user(user_id))

    async def find_user(self, external_id: str) -> Json | None:
        return await self._run(_core.find_user(external_id))

    async def delete_user(self, user_id: str) -> Json:
        return await self._run(_core.delete_user(user_id))

    # --- memory jobs ---

    async def add(
        self,
        user_id: str,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Json:
        return await self._run(
            _core.add(user_id, messages, wait=wait, idempotency_key=idempotency_key, fields=fields)
        )

    async def status(self, request_id: str, *, wait: float | None = None) -> Json:
        return await self._run(_core.status(request_id, wait=wait))

    # --- memories ---

    async def write(
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
        return await self._run(
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

    async def get(self, memory_id: str) -> Json:
        return await self._run(_core.get(memory_id))

    def list(self, user_id: str, **filters: Any) -> AsyncIterator[Json]:
        """Every matching memory, page after page: `async for memory in client.list(...)`."""
        return self._pages(lambda cursor: _core.list_page(user_id, filters, cursor))

    async def search(self, user_id: str, query: str, **options: Any) -> Jsons:
        return await self._run(_core.search(user_id, query, options))

    async def update(
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
        body = _core.update_body(
            content=content, metadata=metadata, base_clock=base_clock, merge=merge, fields=fields
        )
        return await self._run(
            _core.patch(memory_id, body, if_version=if_version, idempotency_key=idempotency_key)
        )

    async def increment(
        self, memory_id: str, by: int = 1, *, idempotency_key: str | None = None
    ) -> Json:
        return await self._run(
            _core.patch(memory_id, {"increment": by}, idempotency_key=idempotency_key)
        )

    async def list_add(
        self, memory_id: str, items: Iterable[Any], *, idempotency_key: str | None = None
    ) -> Json:
        return await self._run(
            _core.patch(memory_id, {"add": [*items]}, idempotency_key=idempotency_key)
        )

    async def list_remove(
        self, memory_id: str, items: Iterable[Any], *, idempotency_key: str | None = None
    ) -> Json:
        return await self._run(
            _core.patch(memory_id, {"remove": [*items]}, idempotency_key=idempotency_key)
        )

    async def delete(self, memory_id: str, *, idempotency_key: str | None = None) -> None:
        await self._run(_core.delete(memory_id, idempotency_key=idempotency_key))

    async def history(self, memory_id: str) -> Jsons:
        return [entry async for entry in self._pages(lambda c: _core.history_page(memory_id, c))]

    async def batch(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        run_async: bool = False,
        idempotency_key: str | None = None,
    ) -> Json:
        return await self._run(
            _core.batch(items, run_async=run_async, idempotency_key=idempotency_key)
        )

    # --- conflicts ---

    async def conflicts(
        self, memory_id: str | None = None, *, status: str | None = "open"
    ) -> Jsons:
        pages = self._pages(lambda c: _core.conflicts_page(memory_id, status, c))
        return [conflict async for conflict in pages]

    async def resolve(self, conflict_id: str, **choice: Any) -> Json:
        return await self._run(_core.resolve(conflict_id, choice))

    # --- events, sync ---

    async def whoami(self) -> Json:
        return await self._run(_core.whoami())

    async def events(self, **filters: Any) -> Jsons:
        return await self._run(_core.events(filters))

    async def sync(
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
        query = _core.sync_query(
            user_id, scope=scope, topic=topic, include_shared=include_shared, topics=topics
        )
        return await self._run(_core.sync(query, since=since, limit=limit))

    async def sync_digest(
        self,
        user_id: str | None = None,
        *,
        scope: str | None = None,
        topic: str | None = None,
        include_shared: bool | None = None,
        topics: Sequence[str] | None = None,
    ) -> Json:
        query = _core.sync_query(
            user_id, scope=scope, topic=topic, include_shared=include_shared, topics=topics
        )
        return await self._run(_core.sync_digest(query))

    def subscribe(
        self,
        channels: str | Sequence[str],
        *,
        last_event_id: str | None = None,
        batch_ms: int | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncSubscription:
        """`async for event in client.subscribe([...])`: as `MemoryClient.subscribe`."""
        state = _core.SubscriptionState(
            [channels] if isinstance(channels, str) else channels,
            last_event_id=last_event_id,
            batch_ms=batch_ms,
            types=types,
        )
        return AsyncSubscription(self, state)


class AsyncSubscription:
    """An async iterator of events that reconnects by itself; `last_event_id` is where it
    stands. Cancelling the task that iterates it (or `close()`) ends it."""

    def __init__(self, client: AsyncMemoryClient, state: _core.SubscriptionState) -> None:
        self._client = client
        self._state = state
        self._closed = asyncio.Event()

    @property
    def last_event_id(self) -> str | None:
        return self._state.last_event_id

    def close(self) -> None:
        self._closed.set()

    def __aiter__(self) -> AsyncIterator[Json]:
        return self._events()

    async def _events(self) -> AsyncIterator[Json]:
        state, client = self._state, self._client
        timeout = httpx.Timeout(client.timeout, read=client.stream_read_timeout)
        while not self._closed.is_set():
            params, headers = state.request()
            error: BaseException | None = None
            try:
                async with client._http.stream(
                    "GET", "/v1/stream", params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _core.raise_for(response)
                    decoder = _core.SSEDecoder()
                    async for line in response.aiter_lines():
                        item = decoder.feed(line)
                        if isinstance(item, str):
                            state.on_comment(item)
                        elif item is not None:
                            for event in state.handle(item):
                                yield event
                            if state.reconnect or self._closed.is_set():
                                break
            except MemoryClientError as exc:
                if _core.fatal(exc):
                    raise
                error = exc
            except (httpx.TransportError, httpx.StreamError) as exc:
                error = exc
            if self._closed.is_set():
                return
            delay = state.failed()
            logger.info("subscription: reconnecting in %.1fs (%r)", delay, error)
            try:
                await asyncio.wait_for(self._closed.wait(), timeout=delay)
                return
            except TimeoutError:
                continue
