"""Writes that carry versions and clocks: direct writes in any scope, changes based on a version
or a clock, list and counter operations, and the conflicts of memories merged by hand.

A change may say what it was based on: `base_version` (If-Match) or `base_clock`. Based on the
current state (or on nothing: a blind write), it applies. Otherwise the memory changed since the
writer last saw it, and the memory decides (see memories.merges for the rules themselves):

- `merge: manual` memories keep both sides as a conflict, apply nothing, and answer 409;
- lists and counters merge their operations (add-wins set, per-agent totals), never 412;
- facts, preferences and conversations: a stale base is 412 unless the write says `merge`;
  then the last writer wins by (written_at, agent_id), and the losing value stays in history
  (an UPDATE overwriting it, or an OVERWRITTEN entry holding it).

Every write ticks the writing agent's counter in the clock, merged with the base clock the
writer saw, so a write based on the result descends from both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from memories import memory_writes, merges, rows, signals
from memories.access import Actor
from memories.errors import ConflictRecorded, InvalidInput, NotFound, VersionConflict
from memories.memory_writes import AppliedChange, content_hash
from memories.models import EndUser, Memory, MemoryConflict, Tenant
from memories.providers import Embedder

REGISTER_TYPES = ("fact", "preference", "conversation")


@dataclass(frozen=True)
class Change:
    """What a PATCH asks for, and what it was based on."""

    content: str | None = None
    metadata: dict[str, Any] | None = None
    occurred_at: datetime | None = None
    list_add: list[Any] | None = None
    list_remove: list[Any] | None = None
    increment: int | None = None
    base_version: int | None = None
    base_clock: dict[str, int] | None = None
    merge: bool = False
    # A client's time for a write it queued offline; never later than the server's receipt.
    written_at: datetime | None = None

    @property
    def sets_value(self) -> bool:
        """A register's part of the change: content or metadata (occurred_at goes with them)."""
        return self.content is not None or self.metadata is not None or bool(self.occurred_at)


def memory_direct_create(
    *,
    tenant: Tenant,
    user: EndUser | None,
    content: str,
    memory_type: str,
    scope: str,
    topic: str,
    metadata: dict[str, Any],
    actor: Actor,
    embedder: Embedder,
    occurred_at: datetime | None = None,
    merge_rule: str = Memory.MergeRule.LWW,
    items: list[Any] | None = None,
    value: int | None = None,
    session_id: str = "",
) -> Memory:
    """A memory written as given, no LLM: version 1, the writer's first tick in its clock. A
    user-scope memory belongs to `user`; a tenant or topic one to no user (`user` must be None),
    its author recorded. A list starts with `items`, a counter at `value`."""
    if (scope == Memory.Scope.USER) != (user is not None):
        message = "Name the user of a user-scope memory, and none for a shared one."
        raise InvalidInput(message, field="user_id")
    if (scope == Memory.Scope.TOPIC) != bool(topic):
        raise InvalidInput("A topic-scope memory needs a topic, and only it.", field="topic")
    if items is not None and memory_type != Memory.Type.LIST:
        raise InvalidInput("Only a list has items.", field="items")
    if value is not None and memory_type != Memory.Type.COUNTER:
        raise InvalidInput("Only a counter has a value.", field="value")
    embedding = embedder.embed([content])[0]
    now = timezone.now()
    agent = actor.agent_id
    # A list's items take a dot each (memories.merges): the clock counts them all.
    clock = {agent: max(1, len(items or []))}
    state: dict[str, Any] = {}
    if memory_type == Memory.Type.LIST:
        state = merges.orset_add(
            merges.orset_empty(), agent_id=agent, counter=1, values=items or [], written_at=now
        )
    elif memory_type == Memory.Type.COUNTER and value:
        state = merges.counter_increment(merges.counter_empty(), agent_id=agent, by=value)
    memory = Memory(
        tenant_id=tenant.id,
        user_id=user.id if user is not None else None,
        scope=scope,
        topic=topic,
        type=memory_type,
        content=content,
        embedding=embedding,
        content_hash=content_hash(content),
        metadata=metadata,
        agent_id=agent,
        session_id=session_id,
        occurred_at=occurred_at or now,
        created_at=now,
        updated_at=now,
        vector_clock=clock,
        written_at=now,
        written_by=agent,
        merge_rule=merge_rule,
        state=state,
        author_key_id=actor.key_id,
    )
    with transaction.atomic():
        memory_writes.memories_write(
            [AppliedChange("ADD", memory, None, versioned=True)],
            actor=agent,
            at=now,
            actor_key_id=actor.key_id,
        )
    return memory


def memory_change(
    *,
    tenant_id: Any,
    memory_id: Any,
    change: Change,
    actor: Actor,
    embedder: Embedder,
    may_write: Callable[[Memory], None] | None = None,
) -> Memory:
    """Apply a PATCH under the rules in the module's opening. Raises VersionConflict (412: a
    stale base without `merge`), ConflictRecorded (409: a manual memory's concurrent write, kept
    as a conflict) or InvalidInput (an operation the memory's type has not). `may_write` is the
    caller's access check, given the memory as locked (one read of it, not two)."""
    # Embedded before the lock is taken, so a slow embedder never holds the row.
    embedding = embedder.embed([change.content])[0] if change.content is not None else None
    now = timezone.now()
    written_at = min(change.written_at, now) if change.written_at else now
    agent = actor.agent_id
    conflict: MemoryConflict | None = None
    with transaction.atomic():
        memory = memory_writes.memory_lock(tenant_id=tenant_id, memory_id=memory_id)
        if may_write is not None:
            may_write(memory)
        _operations_check(memory, change)
        base_clock = change.base_clock or {}
        ticks = max(1, len(change.list_add or []))  # an added item takes a dot of its own
        incoming_clock = merges.clock_tick(base_clock, agent, by=ticks)
        current = _based_on_current(memory, change)
        if not current and memory.merge_rule == Memory.MergeRule.MANUAL:
            conflict = _conflict_record(
                memory, change, agent=agent, clock=incoming_clock, written_at=written_at, at=now
            )
        else:
            if not current and change.sets_value and not change.merge:
                raise VersionConflict(
                    f"Memory is at version {memory.version}; the write was based on an older "
                    "one. Send it again based on the current version, or with merge: true.",
                    current_version=memory.version,
                    clock=memory.vector_clock,
                )
            applied = _applied(memory, change, current=current, agent=agent, at=written_at)
            if embedding is not None and applied.event == "UPDATE":
                memory.embedding = embedding
            memory.vector_clock = merges.clock_tick(
                merges.clock_merge(memory.vector_clock or {}, base_clock), agent, by=ticks
            )
            memory_writes.memories_write([applied], actor=agent, at=now, actor_key_id=actor.key_id)
    if conflict is not None:
        raise ConflictRecorded(
            "The memory changed since the version this write was based on, and it merges by "
            "hand: the write is kept as a conflict, not applied.",
            conflict=conflict_document(conflict),
        )
    return memory


def _operations_check(memory: Memory, change: Change) -> None:
    if (change.list_add or change.list_remove) and memory.type != Memory.Type.LIST:
        raise InvalidInput("add and remove change lists only.", field="add")
    if change.increment is not None and memory.type != Memory.Type.COUNTER:
        raise InvalidInput("increment changes counters only.", field="increment")


def _based_on_current(memory: Memory, change: Change) -> bool:
    """Whether the writer saw the memory as it is: its base clock descends from the memory's,
    or (without a clock) its base version is the current one. No base: a blind write, applied."""
    if change.base_clock is not None:
        return merges.clock_descends(change.base_clock, memory.vector_clock or {})
    if change.base_version is not None:
        return change.base_version == memory.version
    return True


def _applied(
    memory: Memory, change: Change, *, current: bool, agent: str, at: datetime
) -> AppliedChange:
    """The memory as this change leaves it, and its history entry. Lists and counters merge
    their operations whatever the base; a register's value is overwritten when the write is
    current or wins by (written_at, agent_id), else kept in history as the loser."""
    previous = memory.content
    reasons: list[str] = []
    if change.list_add or change.list_remove:
        observed = change.base_clock if not current else None
        state = memory.state or merges.orset_empty()
        if change.list_remove:
            state = merges.orset_remove(state, values=change.list_remove, observed=observed)
            reasons.append(f"removed {len(change.list_remove)} item(s)")
        if change.list_add:
            counter = (memory.vector_clock or {}).get(agent, 0) + 1
            state = merges.orset_add(
                state, agent_id=agent, counter=counter, values=change.list_add, written_at=at
            )
            reasons.append(f"added {len(change.list_add)} item(s)")
        memory.state = state
    if change.increment is not None:
        memory.state = merges.counter_increment(
            memory.state or merges.counter_empty(), agent_id=agent, by=change.increment
        )
        reasons.append(f"incremented by {change.increment}")
    if not change.sets_value:
        memory.written_at, memory.written_by = max(at, memory.written_at), agent
        return AppliedChange(
            "UPDATE", memory, previous, reason="; ".join(reasons) or None, versioned=True
        )
    wins = current or (at, agent) > (memory.written_at, memory.written_by)
    if not wins:
        loser = change.content if change.content is not None else previous
        reason = (
            f"a concurrent write by {agent or 'an agent'} lost to the one by "
            f"{memory.written_by or 'another agent'} (last writer wins); kept here, not applied"
        )
        return AppliedChange("OVERWRITTEN", memory, previous, reason=reason, versioned=True,
                             lost=loser)  # fmt: skip
    if not current:
        reasons.append(
            f"overwrote a concurrent write by {memory.written_by or 'another agent'} "
            "(last writer wins); its value is the previous content"
        )
    if change.content is not None:
        memory.content = change.content
        memory.content_hash = content_hash(change.content)
    if change.metadata is not None:
        memory.metadata = change.metadata
    if change.occurred_at is not None:
        memory.occurred_at = change.occurred_at
    memory.written_at, memory.written_by = at, agent
    return AppliedChange(
        "UPDATE", memory, previous, reason="; ".join(reasons) or None, versioned=True
    )


def _side(
    *, content: str, version: int, clock: dict[str, int], agent_id: str, written_at: datetime
) -> dict[str, Any]:
    return {
        "content": content,
        "version": version,
        "clock": clock,
        "agent_id": agent_id,
        "written_at": written_at.isoformat(),
    }


def _conflict_record(
    memory: Memory,
    change: Change,
    *,
    agent: str,
    clock: dict[str, int],
    written_at: datetime,
    at: datetime,
) -> MemoryConflict:
    """Keep a concurrent write to a manual memory as a conflict: the memory is flagged (no new
    version: its value did not change) and `conflict.detected` is sent."""
    conflict = MemoryConflict.objects.create(
        tenant_id=memory.tenant_id,
        memory=memory,
        current=_side(
            content=memory.content,
            version=memory.version,
            clock=memory.vector_clock or {},
            agent_id=memory.written_by,
            written_at=memory.written_at,
        ),
        incoming={
            **_side(
                content=change.content if change.content is not None else memory.content,
                version=change.base_version or 0,
                clock=clock,
                agent_id=agent,
                written_at=written_at,
            ),
            "metadata": change.metadata,
        },
        created_at=at,
    )
    if not memory.conflicted:
        memory.conflicted = True
        rows.update_rows(Memory, [{"id": memory.id, "conflicted": True}])
    signals.conflict_detected.send(
        sender=MemoryConflict, memory=memory, conflict=conflict_document(conflict)
    )
    return conflict


def conflict_document(conflict: MemoryConflict) -> dict[str, Any]:
    return {
        "id": str(conflict.id),
        "memory_id": str(conflict.memory_id),
        "status": conflict.status,
        "current": conflict.current,
        "incoming": conflict.incoming,
        "created_at": conflict.created_at.isoformat(),
        "resolved_at": conflict.resolved_at.isoformat() if conflict.resolved_at else None,
        "resolution": conflict.resolution,
    }


def conflict_resolve(
    *,
    tenant_id: Any,
    conflict_id: Any,
    choose: str | None,
    content: str | None,
    actor: Actor,
    embedder: Embedder,
) -> tuple[MemoryConflict, Memory]:
    """End an open conflict: keep the current side, take the incoming one, or write `content`.
    The memory's clock takes in the incoming side's, so the result descends from both; it stays
    flagged while it has other open conflicts."""
    with transaction.atomic():
        conflict = (
            MemoryConflict.objects.select_for_update()
            .filter(tenant_id=tenant_id, pk=conflict_id, status=MemoryConflict.Status.OPEN)
            .first()
        )
        if conflict is None:
            raise NotFound("No open conflict with this id.")
        memory = memory_writes.memory_lock(tenant_id=tenant_id, memory_id=conflict.memory_id)
        if content is None:
            side = conflict.incoming if choose == "incoming" else conflict.current
            content = side["content"]
        assert content is not None
        if content != memory.content:
            memory.embedding = embedder.embed([content])[0]
            memory.content, memory.content_hash = content, content_hash(content)
        if choose == "incoming" and conflict.incoming.get("metadata") is not None:
            memory.metadata = conflict.incoming["metadata"]
        now = timezone.now()
        memory.vector_clock = merges.clock_tick(
            merges.clock_merge(memory.vector_clock or {}, conflict.incoming.get("clock") or {}),
            actor.agent_id,
        )
        memory.written_at, memory.written_by = now, actor.agent_id
        conflict.status = MemoryConflict.Status.RESOLVED
        conflict.resolved_at = now
        conflict.resolution = {
            **({"choose": choose} if choose else {"content": content}),
            "agent_id": actor.agent_id,
            "key_id": actor.key_id,
        }
        conflict.save(update_fields=["status", "resolved_at", "resolution"])
        memory.conflicted = (
            MemoryConflict.objects.filter(memory=memory, status=MemoryConflict.Status.OPEN)
            .exclude(pk=conflict.pk)
            .exists()
        )
        reason = f"conflict {conflict.id} resolved: " + (
            f"chose the {choose} side" if choose else "wrote a new value"
        )
        memory_writes.memories_write(
            [
                AppliedChange(
                    "UPDATE", memory, conflict.current["content"], reason=reason, versioned=True
                )
            ],  # fmt: skip
            actor=actor.agent_id,
            at=now,
            actor_key_id=actor.key_id,
        )
    return conflict, memory
