"""`LocalCache`: one user's view of memories, held in process and kept fresh by the change feed.

    cache = LocalCache(client, user_id)      # include_shared=True, topics=(), queue_path=None
    cache.start()                            # warm from the live set, then follow the channels
    cache.get(memory_id); cache.memories(); cache.staleness; cache.verify()
    cache.write("Prefers tea"); cache.update(memory_id, content="...")   # queued while offline
    cache.stop()                             # start() again resumes where it stopped
    LocalCache(client, user_id, on_change=lambda memory_id, memory: ...)  # told of each change

How it stays right:
- Warm-up is a full `sync` (its `next_cursor` kept). A background thread then follows the user's
  channel, the tenant's shared channel and the topics' channels. Each time a connection is
  established (the server's `: subscribed`), what the connection cannot replay is fetched: a
  connection without Last-Event-ID is followed by a `sync` since the cursor, so nothing that
  happened between the warm-up (or a stop) and the subscription is missed.
- Every memory carries a version; a change older than what the cache holds is ignored, so a
  replayed event or an overlapping sync page does no harm. Closed and deleted memories leave
  the live set and are remembered (by version) so a late, older event cannot bring them back.
- `stream-reset` (the position was trimmed from the stream), `memory.cleared` (a user erased) and
  a `410` from sync (the cursor expired; its `snapshot` is followed) rebuild the live set.
- Writes made through the cache carry an Idempotency-Key drawn once per logical write and kept
  with it: while the server is unreachable they wait in a queue (a JSON-lines file at
  `queue_path`, so they survive a restart) and are sent, in order, when the subscription is back;
  sent twice (the answer was lost), the server applies them once.

`on_change(memory_id, memory)`, when given, is called after each change the cache takes in: with
the memory as it now holds it, or None when the memory left the live set (closed, deleted, or
dropped by a rebuild). It runs in the thread that applied the change (the reading thread, or the
one that wrote through the cache), outside the cache's lock, so it may read the cache; the next
event waits for it, so it should be quick. What it raises is logged and ignored: a listener's bug
must not stop the cache following its channels. A replayed or older change, which the cache
ignores, is not reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memoryclient._core import Json
from memoryclient.client import MemoryClient, Subscription
from memoryclient.errors import Gone, MemoryClientError, RateLimited, ServerError, Unreachable

logger = logging.getLogger("memoryclient.cache")

_LIVE_EVENTS = ("memory.created", "memory.updated")
_LEAVING_EVENTS = ("memory.closed", "memory.deleted")
# Refusals that mean "not now": the write stays queued. Any other refusal drops it (`rejected`).
_LATER = (Unreachable, ServerError, RateLimited)

# What `on_change` is told: the memory's id, and the memory now held (None: it left).
Change = tuple[str, Json | None]


@dataclass
class PendingWrite:
    """A write waiting to be sent: `op` is "write" or "update", `args` its keyword arguments."""

    op: str
    args: dict[str, Any]
    idempotency_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    written_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    queued: bool = False  # a first attempt failed: it says when it was made (`written_at`)


class LocalCache:
    def __init__(
        self,
        client: MemoryClient,
        user_id: str,
        *,
        include_shared: bool = True,
        topics: Sequence[str] = (),
        queue_path: str | os.PathLike[str] | None = None,
        batch_ms: int | None = None,
        ready_timeout: float = 10.0,
        on_change: Callable[[str, Json | None], None] | None = None,
    ) -> None:
        self.client = client
        self.user_id = str(user_id)
        self.include_shared = include_shared
        self.topics = tuple(topics)
        self.batch_ms = batch_ms
        self.ready_timeout = ready_timeout
        self.on_change = on_change
        self.queue_path = Path(queue_path) if queue_path is not None else None
        # Writes the server refused for good (bad input, not found...), with the error.
        self.rejected: list[tuple[PendingWrite, MemoryClientError]] = []
        self.error: MemoryClientError | None = None  # what ended the subscription, if anything

        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._live: dict[str, Json] = {}
        self._gone: dict[str, int] = {}
        self._cursor: str | None = None
        self._warmed = False
        self._last_event_id: str | None = None
        self._channels: list[str] | None = None
        self._subscription: Subscription | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._connected = False
        self._fresh_at: float | None = None  # when it last knew itself up to date
        self._queue: list[PendingWrite] = self._queue_load()

    # --- reading ---

    def get(self, memory_id: str) -> Json | None:
        with self._lock:
            memory = self._live.get(str(memory_id))
            return dict(memory) if memory is not None else None

    def memories(self) -> list[Json]:
        with self._lock:
            return [dict(memory) for memory in self._live.values()]

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Json]:
        return iter(self.memories())

    @property
    def last_event_id(self) -> str | None:
        return self._last_event_id

    @property
    def pending(self) -> list[PendingWrite]:
        """Writes not yet acknowledged by the server, oldest first."""
        with self._lock:
            return list(self._queue)

    @property
    def staleness(self) -> float:
        """Seconds of changes it may have missed: 0 while the subscription is live, the time since
        it was lost (or since the last sync) otherwise; infinite before the first warm-up."""
        if self._connected:
            return 0.0
        if self._fresh_at is None:
            return math.inf
        return time.monotonic() - self._fresh_at

    def digest(self) -> Json:
        """`{"count", "hash"}` of what it holds, as `GET /v1/sync/digest` computes it."""
        with self._lock:
            lines = [f"{mid}:{self._live[mid]['version']}" for mid in sorted(self._live)]
        return {"count": len(lines), "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest()}

    def verify(self) -> bool:
        """True when the server's digest of this view's live set matches what the cache holds."""
        remote = self.client.sync_digest(
            self.user_id, include_shared=self.include_shared or None, topics=self.topics or None
        )
        local = self.digest()
        if int(remote.get("count", -1)) != local["count"]:
            return False
        return remote.get("hash") == local["hash"] or (local["count"] == 0 and not remote["hash"])

    # --- running ---

    def start(self) -> None:
        """Warm up (first time), subscribe, and return once the subscription is live (or
        `ready_timeout` passed: then it keeps trying in the background)."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self._channels is None:
            self._channels = self._channels_resolve()
        if not self._warmed:
            self._rebuild()
        self.error = None
        self._ready.clear()
        subscription = self.client.subscribe(
            self._channels, last_event_id=self._last_event_id, batch_ms=self.batch_ms
        )
        subscription.on_subscribed = lambda: self._on_subscribed(subscription)
        subscription.on_disconnected = self._on_disconnected
        self._subscription = subscription
        self._thread = threading.Thread(
            target=self._follow, args=(subscription,), name="memoryclient-cache", daemon=True
        )
        self._thread.start()
        self._ready.wait(self.ready_timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the subscription; what it knows (and its position) is kept for `start()`."""
        subscription, thread = self._subscription, self._thread
        if subscription is not None:
            subscription.close()
        if thread is not None:
            thread.join(timeout)
        self._subscription = self._thread = None
        self._on_disconnected(None)

    def __enter__(self) -> LocalCache:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _channels_resolve(self) -> list[str]:
        channels = [f"user:{self.user_id}:memories"]
        if self.include_shared:
            tenant_id = self.client.whoami()["tenant_id"]
            channels.append(f"tenant:{tenant_id}:shared")
        channels.extend(f"topic:{topic}:updates" for topic in self.topics)
        return channels

    def _follow(self, subscription: Subscription) -> None:
        try:
            for event in subscription:
                self._handle(event)
                self._last_event_id = subscription.last_event_id
        except MemoryClientError as exc:  # refused for good (key revoked, channel forbidden)
            logger.error("local cache: the subscription was refused: %s", exc)
            self.error = exc
        except Exception:
            logger.exception("local cache: following the channels failed")
        finally:
            self._on_disconnected(None)

    def _on_subscribed(self, subscription: Subscription) -> None:
        # Runs in the reading thread before any event of the new connection is read.
        # A failure here raises into the subscription, which reconnects (and comes back here).
        try:
            if subscription.last_event_id is None:
                self._catch_up()  # nothing to replay from: sync what happened since the cursor
            self._connected = True
        finally:
            self._ready.set()
        self.flush()

    def _on_disconnected(self, error: BaseException | None) -> None:
        if self._connected:
            self._fresh_at = time.monotonic()
        self._connected = False

    # --- applying changes ---

    def _handle(self, event: Json) -> None:
        kind = event.get("event_type")
        if kind == "stream-reset" or kind == "memory.cleared":
            self._rebuild()
        elif kind in _LIVE_EVENTS or kind in _LEAVING_EVENTS:
            memory = event.get("memory")
            if isinstance(memory, dict) and memory.get("id"):
                self._notify([self._apply(memory, leaves=kind in _LEAVING_EVENTS)])

    def _apply(self, memory: Json, *, leaves: bool) -> Change | None:
        """Take a change in unless it is older than what is held; what changed, or None."""
        memory_id = str(memory["id"])
        version = int(memory.get("version") or 0)
        with self._lock:
            if self._gone.get(memory_id, -1) >= version:
                return None
            held = self._live.get(memory_id)
            if held is not None and int(held.get("version") or 0) > version:
                return None
            if leaves:
                self._live.pop(memory_id, None)
                self._gone[memory_id] = version
                return memory_id, None
            self._live[memory_id] = dict(memory)
            return memory_id, dict(memory)

    def _apply_change(self, change: Json) -> Change | None:
        leaves = bool(change.get("deleted") or change.get("closed") or change.get("valid_to"))
        return self._apply(change, leaves=leaves)

    def _notify(self, changes: Iterable[Change | None]) -> None:
        if self.on_change is None:
            return
        for change in changes:
            if change is None:
                continue
            try:
                self.on_change(*change)
            except Exception:
                logger.exception("local cache: on_change raised; the cache goes on")

    def _sync_query(self) -> dict[str, Any]:
        return {
            "include_shared": self.include_shared or None,
            "topics": self.topics or None,
        }

    def _sync_all(self, since: str | None) -> tuple[list[Json], str | None]:
        """Every change since the cursor (all pages) and the cursor after them; a cursor too old
        (410) is answered by following the server's snapshot instead."""
        changes: list[Json] = []
        snapshot: str | None = None
        cursor = since
        while True:
            try:
                if snapshot is not None:
                    page = self.client._sync_path(snapshot, since=cursor)
                else:
                    page = self.client.sync(self.user_id, since=cursor, **self._sync_query())
            except Gone as exc:
                if snapshot is not None or since is None:
                    raise
                logger.info("local cache: sync cursor expired; rebuilding from the snapshot")
                snapshot = exc.snapshot or f"/v1/sync?user_id={self.user_id}"
                cursor, changes = None, []
                with self._lock:
                    self._live.clear()
                continue
            changes.extend(page.get("changes") or [])
            cursor = page.get("next_cursor") or cursor
            if not page.get("has_more"):
                return changes, cursor

    def _rebuild(self) -> None:
        with self._lock:
            held = set(self._live)
        changes, cursor = self._sync_all(None)
        with self._lock:
            self._live.clear()
            applied = [self._apply_change(change) for change in changes]
            self._cursor = cursor
            self._warmed = True
            self._fresh_at = time.monotonic()
            applied += self._dropped(held, applied)
        self._notify(applied)

    def _catch_up(self) -> None:
        with self._lock:
            held = set(self._live)
        changes, cursor = self._sync_all(self._cursor)  # a 410 on the way empties the live set
        with self._lock:
            applied = [self._apply_change(change) for change in changes]
            self._cursor = cursor
            self._fresh_at = time.monotonic()
            applied += self._dropped(held, applied)
        self._notify(applied)

    def _dropped(self, held: set[str], applied: list[Change | None]) -> list[Change | None]:
        """Memories held before a sync, gone from the live set after it and not already reported
        as leaving: a rebuild dropped them."""
        reported = {change[0] for change in applied if change is not None}
        return [(mid, None) for mid in held - set(self._live) - reported]

    # --- writing ---

    def write(
        self,
        content: str,
        *,
        type: str = "fact",
        scope: str = "user",
        topic: str | None = None,
        metadata: dict[str, Any] | None = None,
        merge: str | None = None,
    ) -> Json | None:
        """A direct write (into this user's memories, or a shared scope): the memory, or None
        when the server is unreachable and the write was queued."""
        user_id = self.user_id if scope == "user" else None
        args = {
            "user_id": user_id,
            "content": content,
            "type": type,
            "scope": scope,
            "topic": topic,
            "metadata": metadata,
            "merge": merge,
        }
        return self._submit(PendingWrite(op="write", args=args))

    def update(
        self,
        memory_id: str,
        *,
        content: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_version: int | None = None,
        merge: bool = False,
    ) -> Json | None:
        """A correction: the memory, or None when it was queued (the server unreachable)."""
        args = {
            "memory_id": str(memory_id),
            "content": content,
            "metadata": metadata,
            "if_version": if_version,
            "merge": merge,
        }
        return self._submit(PendingWrite(op="update", args=args))

    def _submit(self, pending: PendingWrite) -> Json | None:
        with self._lock:
            self._queue.append(pending)
            self._queue_save()
        return self.flush().get(pending.idempotency_key)

    def flush(self) -> dict[str, Json]:
        """Send the queued writes in order, until one cannot be sent now; returns what the server
        answered, by Idempotency-Key."""
        answered: dict[str, Json] = {}
        with self._flush_lock:
            while True:
                with self._lock:
                    if not self._queue:
                        return answered
                    pending = self._queue[0]
                try:
                    memory = self._send(pending)
                except _LATER as exc:
                    logger.info("local cache: %s queued (%s)", pending.op, exc)
                    if not pending.queued:
                        with self._lock:
                            pending.queued = True
                            self._queue_save()
                    return answered
                except MemoryClientError as exc:
                    logger.warning("local cache: %s refused: %s", pending.op, exc)
                    self.rejected.append((pending, exc))
                else:
                    answered[pending.idempotency_key] = memory
                    self._notify([self._apply(memory, leaves=bool(memory.get("valid_to")))])
                with self._lock:
                    self._queue.remove(pending)
                    self._queue_save()

    def _send(self, pending: PendingWrite) -> Json:
        args, key = dict(pending.args), pending.idempotency_key
        # A write that waited in the queue says when it was made (the server keeps the earlier
        # of that and its own clock, for last-writer-wins).
        extra: dict[str, Any] = {"written_at": pending.written_at} if pending.queued else {}
        if pending.op == "write":
            user_id, content = args.pop("user_id"), args.pop("content")
            return self.client.write(user_id, content, idempotency_key=key, **args, **extra)
        memory_id = args.pop("memory_id")
        return self.client.update(memory_id, idempotency_key=key, **args, **extra)

    def _queue_load(self) -> list[PendingWrite]:
        if self.queue_path is None or not self.queue_path.exists():
            return []
        queue = []
        for line in self.queue_path.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError):
                queue.append(PendingWrite(**json.loads(line)))
        return queue

    def _queue_save(self) -> None:
        if self.queue_path is None:
            return
        temporary = self.queue_path.with_name(self.queue_path.name + ".tmp")
        temporary.write_text("".join(json.dumps(asdict(p)) + "\n" for p in self._queue))
        os.replace(temporary, self.queue_path)  # a crash leaves the old queue or the new one
