"""Waiting for a request to finish without holding a web thread or polling the database:
`GET /v1/requests/{id}?wait=<seconds>` and `POST /v1/memories` with `"wait": <seconds>`.

Django answers both calls as always, from a thread of the pool; when the request is not finished
and the caller asked to wait, the view marks its answer with the WAIT_HEADER (how long). This ASGI
layer, in front of Django, then holds that answer on the event loop until the ledger announces the
request finished (one Redis pub/sub channel, REQUESTS_DONE_CHANNEL, read by one `WaitHub` per
process) or the wait runs out, and answers with the request's status read again through Django:
`200` with the finished status, or, when the wait ran out, the current status (GET) or the `202`
it held (POST). Under WSGI alone (no event loop) the mark is dropped and the call answers at once.

The waiter is registered before the status is read again, so a request that finishes in between
is never missed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from memories.events.stream import REQUESTS_DONE_CHANNEL

logger = logging.getLogger(__name__)

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

WAIT_HEADER = b"x-memory-wait-seconds"
MAX_WAIT_SECONDS = 20
_STATUS_PATH = re.compile(r"/v1/requests/(?P<id>[0-9a-fA-F-]{32,36})/?")
_STATUS_ALIAS = re.compile(r"/get_status/(?P<id>[0-9a-fA-F-]{32,36})/?")
_JOBS_PATH = "/v1/memories"
HUB_READY_TIMEOUT_SECONDS = 5.0


class WaitHub:
    """The one subscriber to REQUESTS_DONE_CHANNEL in this process (and event loop): wakes the
    callers waiting for each announced request id. A lost connection is retried with backoff;
    a waiter that misses an announcement meanwhile ends at its own timeout, with the status."""

    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def wait_ready(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="wait-hub")
        async with asyncio.timeout(HUB_READY_TIMEOUT_SECONDS):
            await self._ready.wait()

    def register(self, request_id: str) -> asyncio.Event:
        done = asyncio.Event()
        self._waiters.setdefault(request_id.lower(), set()).add(done)
        return done

    def unregister(self, request_id: str, done: asyncio.Event) -> None:
        waiting = self._waiters.get(request_id.lower())
        if waiting is not None:
            waiting.discard(done)
            if not waiting:
                del self._waiters[request_id.lower()]

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(REQUESTS_DONE_CHANNEL)
                    self._ready.set()
                    delay = 0.1
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            for request_id in str(message["data"]).split(","):
                                for done in self._waiters.get(request_id, ()):
                                    done.set()
            except (RedisError, OSError) as exc:
                self._ready.clear()
                logger.warning("request waits: Redis failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


_hubs: dict[asyncio.AbstractEventLoop, WaitHub] = {}


def _hub() -> WaitHub:
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = WaitHub(settings.REDIS_URL)
    return _hubs[loop]


class _Captured:
    """An ASGI response held back instead of sent."""

    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.body += message.get("body", b"")

    def wait_seconds(self) -> float:
        for name, value in self.start.get("headers", ()):
            if name.lower() == WAIT_HEADER:
                return min(float(value), MAX_WAIT_SECONDS)
        return 0.0

    async def replay(self, send: ASGISend, *, status: int | None = None) -> None:
        headers = [(n, v) for n, v in self.start.get("headers", ()) if n.lower() != WAIT_HEADER]
        start = {**self.start, "headers": headers}
        if status is not None:
            start["status"] = status
        await send(start)
        await send({"type": "http.response.body", "body": self.body})


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def wait_for_requests(app: ASGIApp) -> ASGIApp:
    """The ASGI app `app` (Django), with the waits of the module's opening."""

    async def status_now(scope: dict[str, Any], request_id: str) -> _Captured:
        """The request's status as `GET /v1/requests/{id}` answers it, with the caller's key."""
        headers = [(n, v) for n, v in scope["headers"] if n.lower() != b"content-length"]
        path = f"/v1/requests/{request_id}"
        status_scope = {
            **scope,
            "method": "GET",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
        }
        captured = _Captured()
        await app(status_scope, _no_body, captured.send)
        return captured

    async def held(
        scope: dict[str, Any], send: ASGISend, first: _Captured, request_id: str, seconds: float
    ) -> None:
        """Answer `first` (Django's answer, marked to wait) once the request finishes or the
        wait runs out."""
        hub = _hub()
        try:
            await hub.wait_ready()
        except (TimeoutError, RedisError, OSError):
            await first.replay(send)  # no announcements to wait for: answer now
            return
        done = hub.register(request_id)
        try:
            deadline = time.monotonic() + seconds
            now = await status_now(scope, request_id)
            if not _finished(now):
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                        await done.wait()
                except TimeoutError:
                    pass
                now = await status_now(scope, request_id)
        finally:
            hub.unregister(request_id, done)
        if scope["method"] == "POST" and not _finished(now):
            await first.replay(send)  # still 202: poll it as before
        else:
            await now.replay(send)

    async def application(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        path, method = scope["path"], scope["method"]
        status_match = _STATUS_PATH.fullmatch(path) or _STATUS_ALIAS.fullmatch(path)
        waits = method == "GET" and status_match is not None and b"wait=" in scope["query_string"]
        if not waits and not (method == "POST" and path.rstrip("/") == _JOBS_PATH):
            await app(scope, receive, send)
            return
        first = _Captured()
        await app(scope, receive, first.send)
        seconds = first.wait_seconds()
        if seconds <= 0:
            await first.replay(send)
            return
        if status_match is not None:
            request_id = status_match["id"]
            query = [(k, v) for k, v in parse_qsl(scope["query_string"].decode()) if k != "wait"]
            scope = {**scope, "query_string": urlencode(query).encode()}
        else:
            request_id = orjson.loads(first.body)["request_id"]
        await held(scope, send, first, request_id, seconds)

    return application


def _finished(captured: _Captured) -> bool:
    if captured.start.get("status") != 200:
        return True  # gone, or the key no longer works: nothing to wait for
    return orjson.loads(captured.body).get("status") in ("success", "failure")
