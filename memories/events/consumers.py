"""Consumer groups on the event stream: at-least-once processing, takeover, dead letters.

Each group (`audit`, `analytics`, `webhooks`) reads `memory:events` with XREADGROUP and acks an
entry only after its handler returned, so a crash means redelivery, never loss: handlers must be
idempotent. One `poll()` does, in order:

1. dead-letter: entries pending for EVENT_CONSUMER_CLAIM_IDLE_MS that were already delivered
   EVENT_CONSUMER_MAX_DELIVERIES times (XPENDING's counter) are claimed, copied to
   `memory:events:dead` with the group, original id, delivery count and last error, and acked;
2. takeover: other entries idle that long (a dead consumer's, or a failed one of ours) are taken
   with XAUTOCLAIM and handled again;
3. new entries: XREADGROUP `>`.

Groups are created from `0`, not `$`: a group created after events were published (first deploy,
a group added later) still processes everything the stream retains. Handlers are idempotent, so
that backfill is safe; the webhooks handler ignores events older than the webhook.

Which handler each group runs is `memories.consumer_groups`; `python manage.py consume_events`
runs them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

import redis
from django.conf import settings
from django.db import close_old_connections, connection
from redis.typing import EncodableT, FieldT

from memories.events.stream import DEAD_LETTER_KEY, STREAM_KEY, StreamEntry, redis_client

logger = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]
# A handler of a whole read at once: what a bulk write's thousand events need (one INSERT, one
# round trip), where a call per entry costs a statement each. Each entry unpacks as
# (stream id, event); a handler that needs only its fields leaves the event undecoded.
ManyHandler = Callable[[list[StreamEntry]], object]

# redis-py types replies for any client: `bytes | str`, and RESP3's shapes too. The client here
# decodes responses and speaks RESP2, so its replies are cast to the shapes it actually returns.
_Entries = list[tuple[str | None, dict[str, str] | None]]


class _Pending(TypedDict):
    """One entry of XPENDING's extended form, as redis-py parses it."""

    message_id: str
    consumer: str
    time_since_delivered: int
    times_delivered: int


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _errors_key(group: str) -> str:
    # The last error of each failing entry, kept in Redis so the consumer that finally
    # dead-letters an entry can report it even if another consumer saw the failure.
    return f"{STREAM_KEY}:errors:{group}"


@dataclass
class StreamConsumer:
    """One consumer of one group. Not thread-safe: give each thread its own."""

    group: str
    handler: Handler
    consumer: str = field(default_factory=default_consumer_name)
    # Tried first on a read of several entries; if it raises, each entry goes through `handler`
    # on its own, so one bad entry is retried and dead-lettered alone, as without it.
    handle_many: ManyHandler | None = None
    # A bulk write's events in one read or two: every read costs each group a few round trips and
    # a query or two, whatever its size.
    batch_size: int = 1000
    claim_idle_ms: int = field(default_factory=lambda: settings.EVENT_CONSUMER_CLAIM_IDLE_MS)
    max_deliveries: int = field(default_factory=lambda: settings.EVENT_CONSUMER_MAX_DELIVERIES)
    client: redis.Redis = field(default_factory=redis_client)
    _claim_cursor: str = field(default="0-0", init=False, repr=False)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM_KEY, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, *, block_ms: int | None = None) -> int:
        """One round (dead letters, takeover, new entries); returns how many entries it touched.

        Blocks up to `block_ms` for new entries only when there was nothing else to do.
        """
        touched = self._dead_letter_exhausted()
        touched += self._handle(self._claim_stale())
        reply = cast(
            list[list[Any]],  # [[stream, entries]]
            self.client.xreadgroup(
                self.group,
                self.consumer,
                {STREAM_KEY: ">"},
                count=self.batch_size,
                block=None if touched else block_ms,
            ),
        )
        return touched + self._handle(reply[0][1] if reply else [])

    def drain(self) -> int:
        """Poll without blocking until a round finds nothing; returns entries touched."""
        self.ensure_group()
        total = 0
        while touched := self.poll():
            total += touched
        return total

    def run(self, stop: threading.Event, *, block_ms: int = 1000) -> None:
        """Poll until `stop` is set; survives Redis outages and a deleted stream."""
        try:
            self.ensure_group()
            while not stop.is_set():
                close_old_connections()  # a long-lived thread must drop dead DB connections
                try:
                    self.poll(block_ms=block_ms)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self.ensure_group()  # the stream was deleted (with its groups)
                except (redis.ConnectionError, redis.TimeoutError):
                    logger.warning("consumer %s/%s: Redis unavailable", self.group, self.consumer)
                    stop.wait(1)
        finally:
            connection.close()

    def _handle(self, entries: _Entries) -> int:
        done: list[str] = []
        failures: dict[FieldT, EncodableT] = {}  # as HSET's mapping is typed
        one_by_one = entries
        if self.handle_many is not None and len(entries) > 1 and self._handled_at_once(entries):
            done = [entry_id for entry_id, fields in entries if entry_id and fields is not None]
            one_by_one = []
        for entry_id, fields in one_by_one:
            if entry_id is None or fields is None:
                # Trimmed from the stream while pending (Redis < 7 still lists it): it is
                # dead-lettered once its deliveries run out.
                continue
            try:
                self.handler(entry_id, json.loads(fields["event"]))
            except Exception as exc:
                logger.exception("consumer %s failed on entry %s", self.group, entry_id)
                failures[entry_id] = f"{type(exc).__name__}: {exc}"[:2000]
            else:
                done.append(entry_id)
        with self.client.pipeline(transaction=False) as pipe:
            if done:
                pipe.xack(STREAM_KEY, self.group, *done)
                pipe.hdel(_errors_key(self.group), *done)
            if failures:
                pipe.hset(_errors_key(self.group), mapping=failures)
            pipe.execute()
        return len(entries)

    def _handled_at_once(self, entries: _Entries) -> bool:
        assert self.handle_many is not None
        try:
            self.handle_many(
                [
                    StreamEntry(entry_id, fields)
                    for entry_id, fields in entries
                    if entry_id is not None and fields is not None
                ]
            )
        except Exception:
            logger.warning(
                "consumer %s: a read of %d entries failed at once; handling each alone",
                self.group,
                len(entries),
                exc_info=True,
            )
            return False
        return True

    def _claim_stale(self) -> _Entries:
        reply = self.client.xautoclaim(
            STREAM_KEY,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.batch_size,
        )
        # Redis 7 adds a third element (ids it dropped because they left the stream).
        self._claim_cursor, entries = reply[0], reply[1]
        return entries

    def _dead_letter_exhausted(self) -> int:
        stale = self.client.xpending_range(
            STREAM_KEY, self.group, min="-", max="+", count=self.batch_size,
            idle=self.claim_idle_ms,
        )  # fmt: skip
        pending_entries = cast(list[_Pending], stale)
        exhausted = [p for p in pending_entries if p["times_delivered"] >= self.max_deliveries]
        if not exhausted:
            return 0
        ids = [p["message_id"] for p in exhausted]
        # XCLAIM with the idle bound, one id at a time: if two consumers race, only one gets it.
        with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xclaim(STREAM_KEY, self.group, self.consumer, self.claim_idle_ms, [entry_id])
            claims = pipe.execute()
        errors = self.client.hmget(_errors_key(self.group), ids)
        dead: list[str] = []
        with self.client.pipeline(transaction=False) as pipe:
            for pending, claimed, error in zip(exhausted, claims, errors, strict=True):
                if not claimed:
                    continue  # another consumer took it first
                fields = claimed[0][1] or {}
                pipe.xadd(
                    DEAD_LETTER_KEY,
                    {
                        **fields,
                        "group": self.group,
                        "original_id": pending["message_id"],
                        "deliveries": pending["times_delivered"],
                        "last_error": error or ("" if fields else "entry left the stream"),
                    },
                    maxlen=settings.EVENT_STREAM_MAXLEN,
                    approximate=True,
                )
                dead.append(pending["message_id"])
            if dead:
                pipe.xack(STREAM_KEY, self.group, *dead)
                pipe.hdel(_errors_key(self.group), *dead)
            pipe.execute()
        for entry_id in dead:
            logger.error("consumer %s dead-lettered entry %s", self.group, entry_id)
        return len(dead)
