"""Memory writes: the one place a memory is created, changed or tombstoned. Every write bumps the
memory's version, adds its history row and records its event in the same transaction; a memory to
change is read under a row lock by one function (`memories_lock`), and only once.

Used by the pipeline (a job's decided changes), the API (PATCH / DELETE) and the admin. Bulk
writes COPY their rows instead (memories.batch) but hash content and lock memories here.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from memories import merges, rows, signals
from memories.errors import NotFound, VersionConflict
from memories.events.schema import EVENT_TYPE_OF_CHANGE
from memories.models import Memory, MemoryHistory, MemoryRequest
from memories.providers import Embedder

logger = logging.getLogger(__name__)


def content_hash(content: str) -> str:
    return hashlib.sha256(content.strip().lower().encode()).hexdigest()


@dataclass(frozen=True)
class PlannedChange:
    """One change the pipeline decided, with UUIDs already mapped back from the LLM's integers.
    A DELETE closes the memory (a contradiction), with the contradicting statement as `reason`."""

    event: str  # ADD | UPDATE | DELETE
    memory_id: str | None
    content: str | None
    embedding: list[float] | None
    reason: str | None = None


def memory_job_changes_apply(
    *, memory_request: MemoryRequest, changes: list[PlannedChange], occurred_at: datetime
) -> list[dict[str, Any]]:
    """Write a job's decided changes (call it inside the transaction that marks the request done),
    as of `occurred_at` (when the job's conversation happened). An ADD is a new memory; an UPDATE
    gives the memory a new version, its old content staying in its history; a DELETE closes the
    memory (`valid_to`): no longer true, not erased. Returns the request's result entries, in
    decision order."""
    payload = memory_request.payload
    assert memory_request.user_id is not None  # a memory job is always for one user
    # A job may write shared memories (scope tenant or topic): they belong to no user.
    scope, topic = payload.get("scope", Memory.Scope.USER), payload.get("topic", "")
    owner_id = memory_request.user_id if scope == Memory.Scope.USER else None
    agent = payload.get("agent_id") or "memory-job"
    now = timezone.now()
    target_ids = [c.memory_id for c in changes if c.event != "ADD"]
    targets: dict[str, Memory] = {}
    if target_ids and owner_id is not None:  # the memories to change, locked (a job of ADDs
        targets = memories_lock(memory_ids=target_ids, user_id=owner_id)  # needs no round trip)
    elif target_ids:
        locked = memories_lock(memory_ids=target_ids, tenant_id=memory_request.tenant_id)
        targets = {
            memory_id: memory
            for memory_id, memory in locked.items()
            if memory.user_id is None and (memory.scope, memory.topic) == (scope, topic)
        }
    applied: list[AppliedChange] = []
    for change in changes:
        if change.event == "ADD":
            assert change.content is not None and change.embedding is not None  # an ADD has both
            memory = Memory(
                tenant_id=memory_request.tenant_id,
                user_id=owner_id,
                scope=scope,
                topic=topic,
                vector_clock={agent: 1},
                written_at=now,
                written_by=agent,
                content=change.content,
                embedding=change.embedding,
                content_hash=content_hash(change.content),
                metadata=payload.get("metadata") or {},
                agent_id=payload.get("agent_id") or "",
                session_id=payload.get("session_id") or "",
                created_at=now,
                updated_at=now,
                occurred_at=occurred_at,
            )
            applied.append(AppliedChange("ADD", memory, None))
            continue
        target = targets.get(change.memory_id or "")
        if target is None or target.valid_to is not None:
            # Forgotten or closed since the decision was made: nothing to apply.
            logger.info("memory %s vanished before %s; skipped", change.memory_id, change.event)
            continue
        previous = target.content
        if change.event == "UPDATE":
            assert change.content is not None and change.embedding is not None
            _memory_set_content(target, content=change.content, embedding=change.embedding)
            target.occurred_at = occurred_at
            applied.append(AppliedChange("UPDATE", target, previous))
        else:
            # Never closed before it began (a conversation sent late, about an earlier time).
            target.valid_to = max(occurred_at, target.occurred_at)
            applied.append(AppliedChange("CLOSE", target, previous, reason=change.reason))
    memories_write(
        applied,
        actor=agent,
        actor_key_id=payload.get("api_key_id"),
        request=memory_request,
        at=now,
    )
    return [
        {
            "event": "DELETE" if change.event == "CLOSE" else change.event,
            "memory_id": str(change.memory.id),
            "content": None if change.event == "CLOSE" else change.memory.content,
            "previous_content": change.previous,
            "occurred_at": change.memory.occurred_at.isoformat(),
            **({"valid_to": change.memory.valid_to.isoformat()} if change.memory.valid_to else {}),
        }
        for change in applied
    ]


@dataclass(frozen=True)
class AppliedChange:
    """A change about to be written: the memory as it will be, and its content before.

    `versioned`: the caller set the memory's clock, written_at and written_by itself (a write
    merged with a concurrent one, memories.versioned_writes); otherwise the write is the actor's
    next one, ticked here. An OVERWRITTEN change records a losing concurrent write (`lost`, its
    content) and leaves the memory's content as it is."""

    event: str  # ADD | UPDATE | CLOSE | DELETE | OVERWRITTEN (MemoryHistory.Event)
    memory: Memory
    previous: str | None
    reason: str | None = None
    versioned: bool = False
    lost: str | None = None


def _memory_set_content(memory: Memory, *, content: str, embedding: list[float]) -> None:
    memory.content = content
    memory.embedding = embedding
    memory.content_hash = content_hash(content)


def memories_write(
    applied: list[AppliedChange],
    *,
    actor: str,
    actor_key_id: str | None = None,
    request: MemoryRequest | None = None,
    at: datetime,
) -> None:
    """Write changes with a statement per kind of row, not per change: one INSERT of the new
    memories, one UPDATE of the changed ones (two when only some have a new embedding), one
    INSERT of the history, one of the events. Changed memories must have been read under a row
    lock in this transaction."""
    # By id: a memory changed twice in one job (UPDATE then DELETE) is written once, as it ends.
    changed: dict[Any, dict[str, Any]] = {}
    for change in applied:
        if change.event == "ADD":
            continue
        memory = change.memory
        if memory.id in changed:
            pass  # a second change of it in this write: one more version, one tick, not two
        else:
            memory.version += 1
            if not change.versioned:
                memory.vector_clock = merges.clock_tick(memory.vector_clock or {}, actor)
                memory.written_at, memory.written_by = at, actor
        memory.updated_at = at
        changed[memory.id] = {
            "id": memory.id,
            "content": memory.content,
            "content_hash": memory.content_hash,
            "metadata": memory.metadata,
            "deleted_at": memory.deleted_at,
            "occurred_at": memory.occurred_at,
            "valid_to": memory.valid_to,
            "version": memory.version,
            "updated_at": at,
            "vector_clock": memory.vector_clock,
            "written_at": memory.written_at,
            "written_by": memory.written_by,
            "state": memory.state,
            "conflicted": memory.conflicted,
        }
        # Locked memories are read without their embedding; one is written only if the change
        # set it (assigning a deferred field loads it into the instance).
        if "embedding" not in memory.get_deferred_fields():
            changed[memory.id]["embedding"] = memory.embedding
    # No save(): post_save would record the events one at a time; they are recorded together
    # below, through the memories_written signal.
    rows.update_rows(Memory, list(changed.values()))
    rows.insert_instances([change.memory for change in applied if change.event == "ADD"])
    _history_insert(applied, actor=actor, actor_key_id=actor_key_id, request=request, at=at)
    signals.memories_written.send(
        sender=Memory,
        changes=[(change.memory, EVENT_TYPE_OF_CHANGE[change.event]) for change in applied],
        api_key_id=actor_key_id,
    )


def _history_insert(
    applied: list[AppliedChange],
    *,
    actor: str,
    actor_key_id: str | None = None,
    request: MemoryRequest | None,
    at: datetime,
) -> None:
    """The history rows of a write, in one statement (bulk writes COPY theirs)."""
    request_id = request.id if request is not None else None
    rows.insert_rows(
        MemoryHistory,
        [
            {
                "memory_id": change.memory.id,
                "event": change.event,
                "old_content": change.previous,
                "new_content": change.lost
                if change.event == "OVERWRITTEN"
                else _content_after(change),
                "actor": actor,
                "actor_key_id": actor_key_id,
                "request_id": request_id,
                "created_at": at,
                "occurred_at": _change_occurred_at(change, at=at),
                "reason": change.reason,
            }
            for change in applied
        ],
    )


def _content_after(change: AppliedChange) -> str | None:
    return change.memory.content if change.event in ("ADD", "UPDATE") else None


def _change_occurred_at(change: AppliedChange, *, at: datetime) -> datetime:
    """When the change became true: a close at the memory's end, a forget when it was asked."""
    if change.event == "OVERWRITTEN":
        return change.memory.written_at  # the loser's own time would reorder the history
    if change.event == "CLOSE":
        assert change.memory.valid_to is not None  # set by the close
        return change.memory.valid_to
    return change.memory.occurred_at if change.event != "DELETE" else at


# Memories are locked for a change without their embedding (a change replaces it or leaves it)
# and their search vector (PostgreSQL derives it from the content).
_NOT_LOCKED = ("embedding", "search_vector")
# In id order, so two writers locking overlapping sets wait for each other instead of deadlocking.
_LOCK_MEMORIES_SQL = f"""
    SELECT {rows.select_columns(Memory, exclude=_NOT_LOCKED)} FROM {Memory._meta.db_table}
    WHERE deleted_at IS NULL AND id = ANY(%s::uuid[]) AND {{owner}} = %s
    ORDER BY id
    FOR UPDATE
"""


def memories_lock(
    *, memory_ids: list[Any], tenant_id: Any = None, user_id: Any = None
) -> dict[str, Memory]:
    """The live memories among these ids that belong to the user (or, without one, the tenant),
    row-locked for a change until the transaction ends, by id; their embedding is not read (it is
    loaded if touched). The one way a memory is locked for a write."""
    if (tenant_id is None) == (user_id is None):
        raise TypeError("memories_lock takes a tenant_id or a user_id")
    owner, owner_id = ("user_id", user_id) if user_id is not None else ("tenant_id", tenant_id)
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_MEMORIES_SQL.format(owner=owner), [list(memory_ids), owner_id])
        locked = [rows.instance_from_row(Memory, row, exclude=_NOT_LOCKED) for row in cursor]
    return {str(memory.id): memory for memory in locked}


def memory_lock(*, tenant_id: Any, memory_id: Any) -> Memory:
    """The tenant's live memory, row-locked for a change; NotFound otherwise (another tenant's
    memory is indistinguishable from none)."""
    try:
        memory_id = str(uuid.UUID(str(memory_id)))
    except ValueError:
        raise NotFound("Memory not found.") from None
    locked = memories_lock(memory_ids=[memory_id], tenant_id=tenant_id)
    if not locked:
        raise NotFound("Memory not found.")
    return locked[memory_id]


def memory_update(
    *,
    tenant_id: Any,
    memory_id: Any,
    embedder: Embedder,
    content: str | None = None,
    metadata: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
    expected_version: int | None = None,
    actor: str = "api",
    actor_key_id: str | None = None,
) -> Memory:
    """A correction, applied synchronously: embedding, update, history and event in one
    transaction, with one locking read of the memory.

    `expected_version` (from If-Match) guards against overwriting a change the caller has not
    seen: a stale version raises VersionConflict and changes nothing. A correction keeps the
    memory's `occurred_at` unless it gives one: the old content was wrong, not superseded.
    """
    # Embedded before the lock is taken, so a slow embedder never holds the row.
    embedding = embedder.embed([content])[0] if content is not None else None
    with transaction.atomic():
        memory = memory_lock(tenant_id=tenant_id, memory_id=memory_id)
        if expected_version is not None and memory.version != expected_version:
            raise VersionConflict(
                f"Memory is at version {memory.version}, not {expected_version}.",
                current_version=memory.version,
            )
        previous = memory.content
        if metadata is not None:
            memory.metadata = metadata
        if occurred_at is not None:
            memory.occurred_at = occurred_at
        if content is not None and embedding is not None:
            _memory_set_content(memory, content=content, embedding=embedding)
        memories_write(
            [AppliedChange("UPDATE", memory, previous)],
            actor=actor,
            actor_key_id=actor_key_id,
            at=timezone.now(),
        )
    return memory


def memory_tombstone(
    *, tenant_id: Any, memory_id: Any, actor: str = "api", actor_key_id: str | None = None
) -> Memory:
    """Forget's write of the memory itself (memories.erasure.memory_forget does the rest): a
    tombstone for pull-sync (id, version, deleted_at) with no content, metadata or embedding,
    its DELETE history row and its event, both content-free. NotFound unless it is live."""
    with transaction.atomic():
        memory = memory_lock(tenant_id=tenant_id, memory_id=memory_id)
        now = timezone.now()
        memory.deleted_at = now
        memory.content, memory.content_hash, memory.metadata = "", "", {}
        memory.embedding = None
        memories_write(
            [AppliedChange("DELETE", memory, None)], actor=actor, actor_key_id=actor_key_id, at=now
        )
    return memory
