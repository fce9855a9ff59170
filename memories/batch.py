"""Bulk writes without the LLM: many creates, updates and deletes in one embedding call and one
transaction, each item answered on its own (one bad item does not sink the rest).

Per-row work is kept off the write path: items are validated by plain code (a DRF serializer per
item would cost more than the write), new memories, their history and their events go in by
binary COPY, and the costly fields (uuids, vectors, jsonb) are encoded by hand into their
binary formats instead of through a Python object per value. Profiled in-process, these are
what a 1,000-item call spends its CPU on: the embedder, packing the vectors, building the
events, psycopg's COPY rows, handing the events to the batch lane, and garbage collection.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from pgvector import Vector

from memories import events, ledger, memory_writes, merges, metrics, rows
from memories.errors import InvalidInput
from memories.jobs import request_run
from memories.memory_writes import content_hash
from memories.models import EndUser, Memory, MemoryHistory, MemoryRequest, Tenant
from memories.providers import Embedder
from memories.providers.wiring import get_embedder
from memories.validation import first_unstorable, parse_datetime_value

ACTIONS = ("create", "update", "delete")
SCOPES = tuple(choice for choice, _ in Memory.Scope.choices)
MEMORY_TYPES = {choice for choice, _ in Memory.Type.choices}


@dataclass
class BatchItem:
    index: int
    action: str
    user_id: str | None  # None: a shared memory (scope tenant or topic)
    memory_id: str | None = None
    content: str | None = None
    # None on an update: the memory keeps the type and metadata it has.
    type: str | None = "fact"
    metadata: dict[str, Any] | None = field(default_factory=dict)
    agent_id: str = ""
    session_id: str = ""
    # When what it records happened; None: when written (a create), unchanged (an update).
    occurred_at: datetime | None = None
    scope: str = Memory.Scope.USER.value
    topic: str = ""

    @property
    def target(self) -> str:
        """The memory an update or a delete names (parse_items made sure it names one)."""
        assert self.memory_id is not None, self
        return self.memory_id

    @property
    def text(self) -> str:
        """The content of a create or an update (parse_items made sure it has one)."""
        assert self.content is not None, self
        return self.content


def _error(index: int, field_name: str, message: str) -> dict[str, Any]:
    return {"index": index, "status": "error", "error": {"field": field_name, "message": message}}


def parse_items(
    raw_items: list[Any], first_index: int = 0
) -> tuple[list[BatchItem], list[dict[str, Any]]]:
    """Check each raw item; return the valid ones and an error result for each invalid one.
    Items are numbered from `first_index`: their places in the whole batch."""
    valid: list[BatchItem] = []
    errors: list[dict[str, Any]] = []
    max_chars = settings.MEMORY_MAX_CONTENT_CHARS
    canonical: dict[str, str] = {}  # a batch names the same few users over and over
    for index, raw in enumerate(raw_items, start=first_index):
        if not isinstance(raw, dict):
            errors.append(_error(index, "item", "Each item must be a JSON object."))
            continue
        action = raw.get("action", "create")
        if action not in ACTIONS:
            errors.append(_error(index, "action", f"Must be one of {', '.join(ACTIONS)}."))
            continue
        scope, topic = raw.get("scope", "user"), raw.get("topic", "")
        if scope not in SCOPES:
            errors.append(_error(index, "scope", f"Must be one of {', '.join(SCOPES)}."))
            continue
        if not isinstance(topic, str) or len(topic) > 200 or bool(topic) != (scope == "topic"):
            errors.append(
                _error(
                    index,
                    "topic",
                    "scope topic needs a topic (200 characters at most), and only it.",
                )
            )  # noqa: E501
            continue
        user_id: str | None = None
        if scope == "user":
            try:
                user_id = _canonical_uuid(raw.get("user_id"), canonical)
            except ValueError:
                errors.append(_error(index, "user_id", "Must be a valid UUID."))
                continue
        elif raw.get("user_id") is not None:
            errors.append(_error(index, "user_id", "A shared memory has no user: leave it out."))
            continue
        memory_id = raw.get("id")
        if action == "create" and memory_id is not None:
            errors.append(_error(index, "id", "Leave out id to create: the service assigns it."))
            continue
        if action != "create":
            try:
                memory_id = _canonical_uuid(memory_id, canonical)
            except ValueError:
                errors.append(_error(index, "id", f"A valid memory id is required to {action}."))
                continue
        content = raw.get("content")
        if action != "delete" and (not isinstance(content, str) or not content.strip()):
            errors.append(_error(index, "content", "A non-empty string is required."))
            continue
        if isinstance(content, str) and len(content) > max_chars:
            errors.append(_error(index, "content", f"At most {max_chars} characters."))
            continue
        # What an update leaves out (or sends as null) stays as it is; a create takes defaults.
        memory_type = raw.get("type")
        if memory_type is None and action != "update":
            memory_type = "fact"
        if memory_type is not None and (
            not isinstance(memory_type, str) or memory_type not in MEMORY_TYPES
        ):
            errors.append(
                _error(index, "type", f"Must be one of {', '.join(sorted(MEMORY_TYPES))}.")
            )
            continue
        metadata = raw.get("metadata")
        if metadata is None and action != "update":
            metadata = {}
        if metadata is not None and not isinstance(metadata, dict):
            errors.append(_error(index, "metadata", "Must be a JSON object."))
            continue
        agent_id, session_id = raw.get("agent_id", ""), raw.get("session_id", "")
        if not isinstance(agent_id, str) or not isinstance(session_id, str):
            errors.append(_error(index, "agent_id", "agent_id and session_id must be strings."))
            continue
        occurred_at = raw.get("occurred_at")
        if occurred_at is not None:
            try:
                occurred_at = parse_datetime_value(occurred_at, field="occurred_at")
            except InvalidInput as exc:
                errors.append(_error(index, "occurred_at", exc.message))
                continue
        # Empty values (most metadata, agent and session ids) hold nothing to refuse.
        unstorable = first_unstorable(
            {
                name: value
                for name, value in (
                    ("content", content),
                    ("metadata", metadata),
                    ("agent_id", agent_id),
                    ("session_id", session_id),
                )
                if value
            }
        )
        if unstorable:
            errors.append(_error(index, *unstorable))
            continue
        valid.append(
            BatchItem(
                index,
                action,
                user_id,
                memory_id,
                content,
                memory_type,
                metadata,
                agent_id[:200],
                session_id[:200],
                occurred_at,
                scope,
                topic,
            )
        )
    return valid, errors


def _canonical_uuid(value: Any, known: dict[str, str]) -> str:
    """The canonical text of a UUID given in any form `uuid.UUID` reads; ValueError if none."""
    text = value if isinstance(value, str) else str(value)
    if text not in known:
        known[text] = str(uuid.UUID(text))
    return known[text]


def memories_batch_apply(
    *,
    tenant: Tenant,
    raw_items: list[Any],
    embedder: Embedder,
    actor: str = "batch",
    actor_key_id: str | None = None,
    on_applied: Callable[[list[dict[str, Any]]], None] | None = None,
    first_index: int = 0,
    changed_before: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Apply a batch; return one result per item, in input order.

    Items are checked first (shape, user of this tenant, memory of that user) and embedded (one
    call per `BATCH_EMBED_CHUNK` texts, before any lock is taken); the valid ones are then written
    in ONE transaction, so a batch is applied entirely or, on a database error, not at all.
    `on_applied(results)` runs inside that transaction (a job marks itself done there).
    For one chunk of a larger batch: `first_index` is the place of its first item in the whole,
    `changed_before` the memories earlier chunks updated or deleted (each at most once a batch).
    """
    items, results = parse_items(raw_items, first_index)
    user_ids = {item.user_id for item in items if item.user_id is not None}
    known_users = {
        str(pk)
        for pk in EndUser.objects.filter(
            tenant=tenant, pk__in=user_ids, erasing_since__isnull=True
        ).values_list("pk", flat=True)
    }
    for item in items:
        if item.user_id is not None and item.user_id not in known_users:
            results.append(_error(item.index, "user_id", "User not found."))
    items = [item for item in items if item.user_id is None or item.user_id in known_users]
    with metrics.timed("embedding", kind="batch"):
        vectors = _embed(embedder, [item for item in items if item.action != "delete"])
    target_ids = [item.target for item in items if item.action != "create"]
    with metrics.timed("database", kind="batch"), transaction.atomic():
        targets: dict[str, Memory] = {}
        if target_ids:  # creates alone need no lock, nor the round trip
            targets = memory_writes.memories_lock(memory_ids=target_ids, tenant_id=tenant.id)
        accepted: list[BatchItem] = []
        claimed = set(changed_before)
        for item in items:
            if item.action == "create":
                accepted.append(item)
            elif not _owned(targets.get(item.target), item):
                results.append(_error(item.index, "id", "Memory not found for this user."))
            elif item.target in claimed:
                results.append(_error(item.index, "id", "The same memory twice in one batch."))
            else:
                claimed.add(item.target)
                accepted.append(item)
        results += _write(
            tenant=tenant,
            items=accepted,
            targets=targets,
            vectors=vectors,
            actor=actor,
            actor_key_id=actor_key_id,
        )
        results.sort(key=lambda result: result["index"])
        if on_applied is not None:
            on_applied(results)
    return results


def _embed(embedder: Embedder, items: list[BatchItem]) -> dict[int, bytes]:
    """Each item's vector in pgvector's binary format, as COPY sends it. Packed as soon as a chunk
    is embedded: a thousand lists of floats kept for the rest of the call would be walked
    through again by every garbage collection the call triggers. An embedder that gives a chunk
    as one array (`embed_array`, the offline one) is packed in one go, with no float objects."""
    chunk = settings.BATCH_EMBED_CHUNK
    embed_array = getattr(embedder, "embed_array", None)
    vectors: dict[int, bytes] = {}
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        texts = [item.text for item in part]
        if embed_array is not None:
            packed = _vectors_binary(embed_array(texts))
        else:
            packed = [_vector_binary(vector) for vector in embedder.embed(texts)]
        vectors.update(zip([item.index for item in part], packed, strict=True))
    return vectors


@dataclass
class NewMemory:
    """A memory about to be COPYed in: the fields the row and its event need, without the cost
    of building a Django model instance per row. Ids are canonical text, as the event and the
    result show them; the COPY sends the 16 bytes of `raw_id`."""

    id: str
    raw_id: bytes
    tenant_id: str
    user_id: str | None
    content: str
    type: str
    metadata: dict[str, Any]
    agent_id: str
    session_id: str
    embedding: bytes  # pgvector's binary format
    created_at: Any
    updated_at: Any
    occurred_at: Any
    scope: str = Memory.Scope.USER.value
    topic: str = ""
    version: int = 1
    valid_to: Any = None  # a new memory is current
    vector_clock: dict[str, int] = field(default_factory=dict)
    written_at: Any = None
    written_by: str = ""
    merge_rule: str = Memory.MergeRule.LWW.value
    conflicted: bool = False
    state: dict[str, Any] = field(default_factory=dict)


# The version (4) and variant (RFC 4122) bits uuid.UUID(version=4) sets, as byte translations.
_UUID4_VERSION = bytes((byte & 0x0F) | 0x40 for byte in range(256))
_UUID4_VARIANT = bytes((byte & 0x3F) | 0x80 for byte in range(256))


def new_uuid4s(count: int) -> list[tuple[bytes, str]]:
    """`count` random (version 4) UUIDs as (16 bytes, canonical text), from one read of the
    system's randomness; no uuid.UUID object each, which would cost more than the row's COPY."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_UUID4_VERSION)
    raw[8::16] = raw[8::16].translate(_UUID4_VARIANT)
    hexed = raw.hex()
    ids = []
    for offset in range(0, 16 * count, 16):
        h = hexed[2 * offset : 2 * offset + 32]
        text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        ids.append((bytes(raw[offset : offset + 16]), text))
    return ids


def _owned(memory: Memory | None, item: BatchItem) -> bool:
    """The memory is the one the item may change: the user's, or a shared one of its scope."""
    if memory is None:
        return False
    if item.user_id is None:
        return memory.user_id is None and (memory.scope, memory.topic) == (item.scope, item.topic)
    return str(memory.user_id) == item.user_id


def _write(
    *,
    tenant: Tenant,
    items: list[BatchItem],
    targets: dict[str, Memory],
    vectors: dict[int, bytes],
    actor: str,
    actor_key_id: str | None = None,
) -> list[dict[str, Any]]:
    if not items:
        return []
    now = timezone.now()
    creates = [item for item in items if item.action == "create"]
    tenant_id = str(tenant.id)
    created = [
        NewMemory(
            id=text_id,
            raw_id=raw_id,
            tenant_id=tenant_id,
            user_id=item.user_id,
            content=item.text,
            # Never None on a create: parse_items gives it the defaults.
            type=item.type or Memory.Type.FACT.value,
            metadata=item.metadata if item.metadata is not None else {},
            agent_id=item.agent_id,
            session_id=item.session_id,
            embedding=vectors[item.index],
            created_at=now,
            updated_at=now,
            occurred_at=item.occurred_at or now,
            scope=item.scope,
            topic=item.topic,
            vector_clock={item.agent_id or actor: 1},
            written_at=now,
            written_by=item.agent_id or actor,
        )
        for item, (raw_id, text_id) in zip(creates, new_uuid4s(len(creates)), strict=True)
    ]
    changed: list[tuple[BatchItem, Memory, str]] = []  # (item, memory, previous content)
    for item in items:
        if item.action == "create":
            continue
        memory = targets[item.target]
        previous = memory.content
        memory.version += 1
        memory.updated_at = now
        writer = item.agent_id or actor
        memory.vector_clock = merges.clock_tick(memory.vector_clock or {}, writer)
        memory.written_at, memory.written_by = now, writer
        if item.action == "update":
            memory.content = item.text
            if item.type is not None:
                memory.type = item.type
            if item.metadata is not None:
                memory.metadata = item.metadata
            memory.embedding = Vector.from_binary(vectors[item.index]).to_list()
            memory.content_hash = content_hash(item.text)
            if item.occurred_at is not None:
                memory.occurred_at = item.occurred_at
        else:
            memory.deleted_at = now
        changed.append((item, memory, previous))

    _copy_memories(created)
    _update_memories(changed)
    history = [(m.raw_id, "ADD", None, m.content, m.occurred_at) for m in created] + [
        (
            m.id.bytes,
            "UPDATE" if item.action == "update" else "DELETE",
            previous,
            m.content if item.action == "update" else None,
            m.occurred_at if item.action == "update" else now,
        )
        for item, m, previous in changed
    ]
    _copy_history(history, actor=actor, actor_key_id=actor_key_id, at=now)
    changes: list[tuple[events.MemoryFields, str]] = [(m, "memory.created") for m in created]
    changes += [(m, f"memory.{item.action}d") for item, m, _ in changed]
    events.record_many(
        [
            events.memory_event(memory, event_type, event_id=event_id)
            for (memory, event_type), (_, event_id) in zip(
                changes, new_uuid4s(len(changes)), strict=True
            )
        ]
    )
    results = [
        {"index": item.index, "status": "ok", "action": "create", "id": m.id, "version": 1}
        for item, m in zip(creates, created, strict=True)
    ]
    return results + [
        {
            "index": item.index,
            "status": "ok",
            "action": item.action,
            "id": str(m.id),
            "version": m.version,
        }
        for item, m, _ in changed
    ]


# Column -> the type psycopg sends its value as. Binary COPY takes every field in its column's
# binary format; uuid, vector and jsonb fields are encoded here (a Python object and a dumper per
# value cost more than the rest of the row) and go as bytea, which psycopg passes on unchanged.
MEMORY_COPY_COLUMNS = {
    "id": "bytea",  # uuid
    "tenant_id": "bytea",  # uuid
    "user_id": "bytea",  # uuid
    "scope": "varchar",
    "topic": "varchar",
    "type": "varchar",
    "content": "text",
    "embedding": "bytea",  # vector
    "content_hash": "varchar",
    "metadata": "bytea",  # jsonb
    "agent_id": "varchar",
    "session_id": "varchar",
    "version": "int4",
    "vector_clock": "bytea",  # jsonb
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "occurred_at": "timestamptz",
    "written_at": "timestamptz",
    "written_by": "varchar",
    "merge_rule": "varchar",
    "conflicted": "bool",
    "state": "bytea",  # jsonb
}
HISTORY_COPY_COLUMNS = {
    "memory_id": "bytea",  # uuid
    "event": "varchar",
    "old_content": "text",
    "new_content": "text",
    "actor": "varchar",
    "actor_key_id": "uuid",
    "created_at": "timestamptz",
    "occurred_at": "timestamptz",
}
# The columns a bulk write leaves to the database, and why. With the lists above they must name
# every column of the model (tests/test_batch.py): a field added to Memory or MemoryHistory is
# then copied, or listed here, never silently left out of bulk writes.
COPY_COLUMNS_LEFT_OUT = {
    Memory: {
        "deleted_at": "a new memory is live",
        "valid_to": "a new memory is current",
        "change_txid": "the trigger sets it",
        "search_vector": "a generated column: PostgreSQL computes it",
        "author_key_id": "bulk writes record their actor in the history and events",
        "ann_indexed": "a new row waits outside the approximate index (its database default)",
    },
    MemoryHistory: {
        "id": "a sequence",
        "request_id": "bulk writes do not record it",
        "reason": "bulk writes close nothing",
    },
}
_EMPTY_JSONB = b"\x01{}"


def _jsonb_binary(value: Any) -> bytes:
    # jsonb's binary format: a version byte (1), then the JSON text.
    if value == {}:
        return _EMPTY_JSONB
    return b"\x01" + rows.json_bytes(value)


@lru_cache(maxsize=8)
def _vector_struct(dimensions: int) -> struct.Struct:
    # pgvector's binary format: dimensions and an unused field (uint16 each), then big-endian
    # float32s, as pgvector.Vector.to_binary() writes it.
    return struct.Struct(f">HH{dimensions}f")


def _vector_binary(vector: list[float]) -> bytes:
    return _vector_struct(len(vector)).pack(len(vector), 0, *vector)


def _vectors_binary(matrix: np.ndarray) -> list[bytes]:
    """Each row of a (texts x dimensions) array in pgvector's binary format, packed at once."""
    count, dimensions = matrix.shape
    layout = np.dtype([("dimensions", ">u2"), ("unused", ">u2"), ("values", ">f4", dimensions)])
    rows = np.zeros(count, dtype=layout)
    rows["dimensions"] = dimensions
    rows["values"] = matrix
    packed, size = rows.tobytes(), layout.itemsize
    return [packed[offset : offset + size] for offset in range(0, count * size, size)]


def _copy_memories(memories: list[NewMemory]) -> None:
    if not memories:
        return
    columns = ", ".join(MEMORY_COPY_COLUMNS)
    statement = f"COPY memories_memory ({columns}) FROM STDIN WITH (FORMAT BINARY)"
    raw_ids: dict[str, bytes] = {}  # tenant and users: a few ids, each on many rows
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        copy.set_types(list(MEMORY_COPY_COLUMNS.values()))
        for m in memories:
            for text_id in (m.tenant_id, m.user_id):
                if text_id is not None and text_id not in raw_ids:
                    raw_ids[text_id] = uuid.UUID(text_id).bytes
            copy.write_row(
                (
                    m.raw_id,
                    raw_ids[m.tenant_id],
                    raw_ids[m.user_id] if m.user_id is not None else None,
                    m.scope,
                    m.topic,
                    m.type,
                    m.content,
                    m.embedding,
                    content_hash(m.content),
                    _jsonb_binary(m.metadata),
                    m.agent_id,
                    m.session_id,
                    m.version,
                    _jsonb_binary(m.vector_clock),
                    m.created_at,
                    m.updated_at,
                    m.occurred_at,
                    m.written_at,
                    m.written_by,
                    m.merge_rule,
                    m.conflicted,
                    _jsonb_binary(m.state),
                )
            )


def _update_memories(changed: list[tuple[BatchItem, Memory, str]]) -> None:
    """The changed memories in one UPDATE per kind of change: an update writes its new content
    and embedding, a delete its tombstone alone (its embedding was never read: a deferred field
    named here would cost a query per memory)."""
    rows.update_rows(Memory, [_changed_row(item, memory) for item, memory, _ in changed])


def _changed_row(item: BatchItem, memory: Memory) -> dict[str, Any]:
    row = {
        "id": memory.id,
        "version": memory.version,
        "updated_at": memory.updated_at,
        "vector_clock": memory.vector_clock,
        "written_at": memory.written_at,
        "written_by": memory.written_by,
    }
    if item.action == "update":
        row |= {
            "content": memory.content,
            "type": memory.type,
            "metadata": memory.metadata,
            "embedding": memory.embedding,
            "content_hash": memory.content_hash,
            "occurred_at": memory.occurred_at,
        }
    else:
        row["deleted_at"] = memory.deleted_at
    return row


def _copy_history(
    entries: list[tuple], *, actor: str, actor_key_id: str | None = None, at: Any
) -> None:
    columns = ", ".join(HISTORY_COPY_COLUMNS)
    statement = f"COPY {MemoryHistory._meta.db_table} ({columns}) FROM STDIN WITH (FORMAT BINARY)"
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        copy.set_types(list(HISTORY_COPY_COLUMNS.values()))
        key_id = uuid.UUID(actor_key_id) if actor_key_id else None
        for memory_id, event, old, new, occurred_at in entries:
            copy.write_row((memory_id, event, old, new, actor, key_id, at, occurred_at))


def batch_request_work(claim: ledger.Claim, memory_request: MemoryRequest) -> None:
    """The work of an asynchronous batch, for `jobs.request_run`: BATCH_MAX_ITEMS items at a
    time, each chunk in its own transaction together with the request's progress (the results so
    far, fenced by the claim; the last chunk's transaction marks it `success`). An attempt that
    fails part way leaves the chunks it committed; the next attempt starts after them, so no item
    is applied twice and no chunk's lock is held while the next is written."""
    items: list[Any] = memory_request.payload["items"]
    done: list[dict[str, Any]] = list(memory_request.result or [])
    chunk = settings.BATCH_MAX_ITEMS
    embedder = get_embedder()
    for start in range(len(done), len(items), chunk):
        finish = (
            ledger.memory_request_mark_success
            if start + chunk >= len(items)
            else ledger.batch_request_record_progress
        )
        changed = frozenset(
            r["id"] for r in done if r["status"] == "ok" and r["action"] != "create"
        )
        results = memories_batch_apply(
            tenant=memory_request.tenant,
            raw_items=items[start : start + chunk],
            embedder=embedder,
            actor="batch-job",
            on_applied=partial(_record_chunk, finish, claim, done),
            first_index=start,
            changed_before=changed,
        )
        done = done + results


def _record_chunk(
    finish: Callable[..., None],
    claim: ledger.Claim,
    done: list[dict[str, Any]],
    results: list[dict[str, Any]],
) -> None:
    finish(claim=claim, result=done + results)


def batch_request_run(*, request_id: str) -> str:
    """Run one asynchronous batch end to end (see `jobs.request_run` for the outcomes)."""
    return request_run(request_id=request_id, work=batch_request_work)
