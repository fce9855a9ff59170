"""Who may keep an event stream open: at most SSE_MAX_STREAMS_PER_TENANT streams per tenant
across every web process (leases in Redis, so a crashed process's streams stop counting once
their lease lapses), and only while the stream's key stays usable (revoked, expired or deleted:
the stream ends). One guard per process does both for all its streams, with one Redis round
trip and one database query per round, however many streams are open.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from memories.models import ApiKey

logger = logging.getLogger(__name__)

# KEYS[1] the tenant's open streams (member: stream id, score: when its lease ends); ARGV: now,
# lease end, cap, stream id, key lifetime. 1 if admitted.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def _streams_key(tenant_id: str) -> str:
    return f"sse:streams:{tenant_id}"


def _round_seconds() -> float:
    return max(1.0, min(settings.API_KEY_CACHE_SECONDS, 10.0))


def _lease_seconds() -> int:
    return int(max(30.0, 3 * _round_seconds()))


@dataclass
class _OpenStream:
    tenant_id: str
    api_key_id: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class TooManyStreams(Exception):
    """The tenant has SSE_MAX_STREAMS_PER_TENANT streams open already."""


class StreamGuard:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._open: dict[str, _OpenStream] = {}
        self._task: asyncio.Task[None] | None = None

    async def admit(self, *, tenant_id: str, api_key_id: str) -> tuple[str, asyncio.Event]:
        """Count the stream in; returns its id and an Event set when it must end (its key is
        no longer usable). Raises TooManyStreams."""
        stream_id = uuid.uuid4().hex
        now = time.time()
        admitted = await self._admit(
            keys=[_streams_key(tenant_id)],
            args=[now, now + _lease_seconds(), settings.SSE_MAX_STREAMS_PER_TENANT, stream_id,
                  _lease_seconds() * 2],
        )  # fmt: skip
        if not admitted:
            raise TooManyStreams(tenant_id)
        stream = _OpenStream(tenant_id=tenant_id, api_key_id=api_key_id)
        self._open[stream_id] = stream
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())
        return stream_id, stream.ended

    async def release(self, stream_id: str) -> None:
        stream = self._open.pop(stream_id, None)
        if stream is not None:
            await self.redis.zrem(_streams_key(stream.tenant_id), stream_id)

    async def _watch(self) -> None:
        while self._open:
            await asyncio.sleep(_round_seconds())
            try:
                await self._round()
            except Exception:  # a failed round only delays the next; streams go on
                logger.exception("stream guard: a round failed")

    async def _round(self) -> None:
        streams = dict(self._open)
        if not streams:
            return
        lease_end = time.time() + _lease_seconds()
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream_id, stream in streams.items():
                pipe.zadd(_streams_key(stream.tenant_id), {stream_id: lease_end}, xx=True)
            await pipe.execute()
        key_ids = {stream.api_key_id for stream in streams.values()}
        usable = await sync_to_async(_usable_keys, thread_sensitive=False)(key_ids)
        for stream in streams.values():
            if stream.api_key_id not in usable:
                stream.ended.set()


def _usable_keys(key_ids: set[str]) -> set[str]:
    close_old_connections()
    try:
        now = timezone.now()
        usable = ApiKey.objects.filter(pk__in=key_ids, revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        )
        return {str(pk) for pk in usable.values_list("pk", flat=True)}
    finally:
        close_old_connections()
