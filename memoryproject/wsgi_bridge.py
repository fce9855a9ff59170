"""Django's WSGI handler under uvicorn, with one thread hop per request.

a2wsgi, which this replaces for the API, hands every step of a request across threads: each read
of the body, the response's start, each chunk, and its end are a round trip between the view's
thread and the event loop, five per JSON call. Here the body is read on the loop before the view
runs (it is small: Django refuses more than DATA_UPLOAD_MAX_MEMORY_SIZE; see `_read_body`), the
view runs in a fixed pool of threads, and a response that is not streaming comes back whole and is
sent from the loop. Only a streaming response is still sent chunk by chunk from its thread, as it
is produced. a2wsgi still builds the WSGI environ (`build_environ`).
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from a2wsgi.asgi_typing import HTTPScope
from a2wsgi.wsgi import build_environ
from django.conf import settings

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
# The server's send: it takes any message mapping (as Django's ASGI handler is typed to need) and
# returns a coroutine, which `run_coroutine_threadsafe` requires to send from a view's thread.
ASGISend = Callable[[Mapping[str, Any]], Coroutine[Any, Any, None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Response:
    """What the WSGI app answered: status and headers, then the body whole, or None when it
    streams (sent from the thread as it comes)."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.body: bytes | None = None
        self.started_sending = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        # PEP 3333: with exc_info, the app replaces the status and headers (an error page), unless
        # they have already gone out.
        if exc_info is not None and self.started_sending:
            raise exc_info[1].with_traceback(exc_info[2])
        self.start = {
            "type": "http.response.start",
            "status": int(status.split(" ", 1)[0]),
            "headers": [
                (name.lower().encode("latin1"), value.encode("latin1")) for name, value in headers
            ],
        }
        return self._refuse_write

    @staticmethod
    def _refuse_write(chunk: bytes) -> None:
        # WSGI's legacy write(); Django never calls it.
        raise NotImplementedError("write() is not supported; return an iterable instead")


class BufferedWSGIMiddleware:
    """An ASGI app serving a WSGI app from `threads` threads; see the module's docstring."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        threads: int,
        body_welcome: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        # Asked (in a thread) before a body is read: False leaves the body unread, and the app
        # answers from the headers alone (a call without a valid key gets its 401 so).
        self.body_welcome = body_welcome

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        loop = asyncio.get_running_loop()
        welcome = self.body_welcome is None or not _content_length(scope)
        if not welcome and self.body_welcome is not None:
            welcome = await loop.run_in_executor(self.executor, self.body_welcome, scope)
        body = await _read_body(scope, receive) if welcome else b""
        if body is None:
            return  # the client left before its request was whole: nobody to answer
        # a2wsgi types the scope and the environ as TypedDicts: they are the plain dicts ASGI and
        # WSGI pass, typed so here and by Django's WSGIHandler.
        environ = cast(
            dict[str, Any],
            build_environ(
                cast(HTTPScope, scope),
                io.BytesIO(body),  # type: ignore[arg-type]  # a2wsgi wants its Body; any file works
            ),
        )
        environ["wsgi.errors"] = sys.stderr
        run = contextvars.copy_context().run
        response = await loop.run_in_executor(self.executor, run, self._run, environ, send, loop)
        if response.body is not None:
            assert response.start is not None  # `_run` raises when the app never started
            await send(response.start)
            await send({"type": "http.response.body", "body": response.body})

    def _run(
        self, environ: dict[str, Any], send: ASGISend, loop: asyncio.AbstractEventLoop
    ) -> _Response:
        response = _Response()
        iterable = self.app(environ, response.start_response)
        try:
            if response.start is None:
                raise RuntimeError("the WSGI app returned without calling start_response")
            if not getattr(iterable, "streaming", False):
                response.body = b"".join(iterable)
                return response

            def send_now(message: dict[str, Any]) -> None:
                asyncio.run_coroutine_threadsafe(send(message), loop).result()

            response.started_sending = True
            send_now(response.start)
            for chunk in iterable:
                send_now({"type": "http.response.body", "body": chunk, "more_body": True})
            send_now({"type": "http.response.body", "body": b""})
            return response
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()


async def _read_body(scope: dict[str, Any], receive: ASGIReceive) -> bytes | None:
    """The body Django's handler will read: its Content-Length's worth, when that is within
    DATA_UPLOAD_MAX_MEMORY_SIZE. Above it nothing is read (Django refuses the call from the header,
    and the client gets no `100 Continue` inviting the upload); without a Content-Length nothing
    is read either, since Django's WSGI request reads none of such a body. None if the client
    went away first.

    Django leaves file uploads out of that limit; bodies above it are not read here all the same,
    since this service takes no uploads (one that does would need them streamed to its thread).
    A slow body waits here on the loop and holds no thread; what the waiting bodies hold in
    memory is bounded by that limit times the connections uvicorn admits (`--limit-concurrency`).
    """
    declared = _content_length(scope)
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if declared == 0 or (limit is not None and declared > limit):
        return b""
    chunks: list[bytes] = []
    size = 0
    while size < declared:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _content_length(scope: dict[str, Any]) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return max(int(value), 0)
            except ValueError:
                return 0  # as Django reads a malformed one
    return 0
