"""`GET /dashboard/stream?tenant=<id>[&user=<id>][&last_event_id=<id>]`: the dashboard's live
feed, as Server-Sent Events, for a signed-in staff user (Django's session cookie).

EventSource cannot send an Authorization header, so the dashboard cannot use `/v1/stream` with
a key; this path asks the session instead, and otherwise is `/v1/stream`: the same hub, the same
frames, resumable with Last-Event-ID. It hears every event of the tenant (`sse.TENANT_WIDE`),
or, with `user`, that user's memory channel. It is served before Django, like `/v1/stream`, so
an open feed holds no thread; the session is checked again every SESSION_RECHECK_SECONDS, and a
signed-out (or no longer staff) user's feed ends. A browser sends the cookie only to this origin
and no CORS header is given, so another site cannot read the feed. Staff feeds do not count
against a tenant's SSE_MAX_STREAMS_PER_TENANT: they are not the tenant's.
"""

from __future__ import annotations

import asyncio
import logging
from http.cookies import SimpleCookie
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.db import close_old_connections
from django.http import HttpRequest, QueryDict

from memories import selectors
from memories.errors import NotFound
from memories.events.schema import user_channel
from memories.events.sse import (
    HUB_READY_TIMEOUT_SECONDS,
    STREAM_ID,
    TENANT_WIDE,
    ASGIReceive,
    ASGISend,
    StreamRefused,
    StreamRequest,
    get_hub,
    serve_event_stream,
)

logger = logging.getLogger(__name__)

SESSION_RECHECK_SECONDS = 10.0


def _staff_signed_in(session_key: str | None) -> bool:
    """Whether the session belongs to an active staff user (Django's own check: the session's
    user, its backend, and its auth hash, so a changed password ends old sessions)."""
    if not session_key:
        return False
    close_old_connections()
    try:
        request = HttpRequest()
        request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        user = get_user(request)
        return bool(user.is_authenticated and user.is_active and user.is_staff)
    finally:
        close_old_connections()


def _authorize(
    session_key: str | None, query: QueryDict, last_event_id: str | None
) -> StreamRequest:
    if not _staff_signed_in(session_key):
        raise StreamRefused(403, "forbidden", "Sign in to the dashboard as staff first.")
    close_old_connections()
    try:
        try:
            tenant = selectors.tenant_get(tenant_id=query.get("tenant", ""))
            channels: tuple[str, ...] = (TENANT_WIDE,)
            if query.get("user"):
                user = selectors.end_user_get(tenant=tenant, user_id=query.get("user", ""))
                channels = (user_channel(user.id),)
        except NotFound as exc:
            raise StreamRefused(404, "not_found", exc.message, exc.details.get("field")) from exc
    finally:
        close_old_connections()
    raw_id = (last_event_id or query.get("last_event_id") or "").strip()
    return StreamRequest(
        tenant_id=str(tenant.id),
        api_key_id="",
        channels=channels,
        types=None,
        last_event_id=raw_id if raw_id and _is_stream_id(raw_id) else None,
    )


def _is_stream_id(value: str) -> bool:
    return STREAM_ID.fullmatch(value) is not None


def _session_key(headers: dict[bytes, bytes]) -> str | None:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed Cookie header is no session
        return None
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel is not None else None


async def _watch_session(session_key: str | None, ended: asyncio.Event) -> None:
    check = sync_to_async(_staff_signed_in, thread_sensitive=False)
    while not ended.is_set():
        await asyncio.sleep(SESSION_RECHECK_SECONDS)
        try:
            if not await check(session_key):
                ended.set()
        except Exception:  # a failed check only delays the next one
            logger.exception("dashboard stream: the session check failed")


async def dashboard_stream_app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    """The ASGI app behind `/dashboard/stream` (mounted in memoryproject.asgi)."""
    headers = dict(scope["headers"])
    session_key = _session_key(headers)
    try:
        if scope["method"] != "GET":
            raise StreamRefused(405, "method_not_allowed", f"Method {scope['method']} not allowed.")
        last_event_id = headers.get(b"last-event-id")
        wanted = await sync_to_async(_authorize, thread_sensitive=False)(
            session_key,
            QueryDict(scope["query_string"].decode("latin-1")),
            None if last_event_id is None else last_event_id.decode("latin-1"),
        )
        hub = get_hub()
        try:
            await hub.wait_ready(timeout=HUB_READY_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise StreamRefused(503, "unavailable", "The event stream is unavailable.") from exc
    except StreamRefused as refused:
        await refused.send_to(send)
        return
    ended = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_session(session_key, ended))
    try:
        await serve_event_stream(hub, wanted, receive, send, must_end=ended)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
