"""Erasure: forgetting a memory, and erasing a user, everywhere the service keeps a copy.

- Forget (`DELETE /v1/memories/{id}`): the memory keeps a content-free tombstone (id, version,
  deleted_at) for pull-sync; its content, metadata and embedding go, and so do the contents of its
  history, of the results of the requests that wrote it, of its events in the outbox, the streams,
  the webhook deliveries and the audit log. The audit keeps who forgot which id, and when.
- Erase a user (`DELETE /v1/users/{id}`): a request of kind `erasure`, run in a worker like any
  job (it names the user in its payload and is owned by nobody, so its status survives the user).
  It detaches the memories the user wrote into shared scopes (they belong to the tenant and stay,
  with no user), then removes, chunk by chunk so no transaction is long, the user's own memories
  and their history, sessions and messages, requests, outbox rows and stream entries, scrubs what
  other rows hold of them (batch payloads, audit and webhook payloads), then the user; the
  result is a receipt.

Closing a memory (a contradiction the pipeline decides) keeps the old fact as history: that is
not erasure and does not come here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memories import dispatch, ledger, memory_writes, signals
from memories.events.stream import (
    DEAD_LETTER_KEY,
    STREAM_KEY,
    read_range,
    redis_client,
    tenant_stream_key,
)
from memories.jobs import request_run
from memories.models import (
    AuditLogEntry,
    EndUser,
    Memory,
    MemoryHistory,
    MemoryRequest,
    Message,
    OutboxEvent,
    Session,
)
from webhooks.models import WebhookDelivery

logger = logging.getLogger(__name__)

# Rows removed or scrubbed per transaction.
CHUNK = 1000
_SCAN_PAGE = 1000


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event without anything a person said: the memory's content and metadata, and the
    data (a message, a summary, a search query); what happened, to which ids, when, stays."""
    scrubbed = {**event, "data": {}}
    if isinstance(event.get("memory"), dict):
        scrubbed["memory"] = {**event["memory"], "content": None, "metadata": {}}
    return scrubbed


# --- Forget a memory -----------------------------------------------------------------------------


def memory_forget(
    *, tenant_id: Any, memory_id: Any, actor: str = "api", actor_key_id: str | None = None
) -> None:
    """Forget the tenant's memory everywhere (see the module's opening); NotFound if it is not
    live. The database's copies go in one transaction; the streams' entries right after it."""
    with transaction.atomic():
        memory = memory_writes.memory_tombstone(
            tenant_id=tenant_id, memory_id=memory_id, actor=actor, actor_key_id=actor_key_id
        )
        forgotten = str(memory.id)
        MemoryHistory.objects.filter(memory_id=memory.id).update(
            old_content=None, new_content=None, reason=None
        )
        _scrub_request_results(tenant_id=tenant_id, memory_id=forgotten)
        _scrub_json_rows(
            OutboxEvent,
            "payload->'memory'->>'id' = %s",
            [forgotten],
            scrub_event,
            since_id=_outbox_id_at(memory.created_at),
        )
        _event_copies_scrub(tenant_id=tenant_id, payload__memory__id=forgotten)
    _stream_entries_remove(tenant_id=str(tenant_id), matches=lambda event: _says(event, forgotten))


def _event_copies_scrub(*, tenant_id: Any, **lookup: str) -> dict[str, int]:
    """Scrub the tenant's webhook deliveries and audit entries whose event matches `lookup`
    (a payload lookup); returns how many of each."""
    copies: dict[str, Any] = {
        "webhook_deliveries_scrubbed": WebhookDelivery.objects.filter(
            webhook__tenant_id=tenant_id, **lookup
        ),
        "audit_entries_scrubbed": AuditLogEntry.objects.filter(tenant_id=tenant_id, **lookup),
    }
    counts = {}
    for kind, queryset in copies.items():
        model = queryset.model
        counts[kind] = sum(
            model.objects.filter(pk=pk).update(payload=scrub_event(payload))
            for pk, payload in queryset.values_list("pk", "payload").iterator(chunk_size=CHUNK)
        )
    return counts


def _says(event: dict[str, Any], memory_id: str) -> bool:
    """Whether the event carries something the memory said (not the tombstone's own event)."""
    memory = event.get("memory")
    if not isinstance(memory, dict) or memory.get("id") != memory_id:
        return False
    return memory.get("content") is not None or bool(memory.get("metadata"))


def _outbox_id_at(moment: Any) -> int:
    """The first outbox row written at or after `moment` (ids grow with time): no event of a
    memory predates its creation, so the search for its events starts there."""
    first = OutboxEvent.objects.filter(created_at__gte=moment).order_by("id").values("id")[:1]
    return first[0]["id"] if first else 0


def _scrub_request_results(*, tenant_id: Any, memory_id: str) -> None:
    """The results (and a batch's items) of the tenant's requests that wrote this memory."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {MemoryRequest._meta.db_table} WHERE tenant_id = %s"
            " AND (result @> %s::jsonb OR result @> %s::jsonb)",
            [
                tenant_id,
                json.dumps([{"memory_id": memory_id}]),
                json.dumps([{"id": memory_id}]),
            ],
        )
        ids = [row[0] for row in cursor.fetchall()]
    for memory_request in MemoryRequest.objects.filter(pk__in=ids).only("pk", "payload", "result"):
        result, payload = memory_request.result, memory_request.payload
        for entry in result:
            if memory_id in (entry.get("memory_id"), entry.get("id")):
                entry.pop("content", None)
                entry.pop("previous_content", None)
                index = entry.get("index")
                items = payload.get("items") if isinstance(payload, dict) else None
                if isinstance(index, int) and isinstance(items, list) and index < len(items):
                    items[index] = _item_scrubbed(items[index])
        MemoryRequest.objects.filter(pk=memory_request.pk).update(result=result, payload=payload)


def _item_scrubbed(item: Any) -> Any:
    if not isinstance(item, dict):
        return None
    return {key: value for key, value in item.items() if key not in ("content", "metadata")}


def _scrub_json_rows(
    model: type[Any],
    condition: str,
    params: list[Any],
    scrub: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    since_id: int = 0,
) -> int:
    """Rewrite the `payload` of the model's rows matching `condition` (SQL over the payload)."""
    table = model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, payload FROM {table} WHERE id >= %s AND {condition}", [since_id, *params]
        )
        found = cursor.fetchall()
    for row_id, payload in found:
        model.objects.filter(pk=row_id).update(payload=scrub(payload))
    return len(found)


def _stream_entries_remove(*, tenant_id: str, matches: Callable[[dict[str, Any]], bool]) -> int:
    """Delete the tenant's stream entries whose event matches, from its stream and the shared
    one (same ids), and matching dead letters; returns how many. Reads only the tenant's own
    stream (and the dead letters)."""
    client = redis_client()
    tenant_key = tenant_stream_key(tenant_id)
    removed = 0
    for entry_ids in _matching_entries(tenant_key, matches):
        with client.pipeline(transaction=False) as pipe:
            pipe.xdel(tenant_key, *entry_ids)
            pipe.xdel(STREAM_KEY, *entry_ids)
            removed += pipe.execute()[0]
    for entry_ids in _matching_entries(
        DEAD_LETTER_KEY,
        lambda event: event.get("source", {}).get("tenant_id") == tenant_id and matches(event),
    ):
        client.xdel(DEAD_LETTER_KEY, *entry_ids)
    return removed


def _matching_entries(key: str, matches: Callable[[dict[str, Any]], bool]) -> Iterable[list[str]]:
    start = "-"
    while True:
        page = read_range(start=start, count=_SCAN_PAGE, key=key)
        found = [
            entry_id
            for entry_id, fields in page
            if "event" in fields and matches(json.loads(fields["event"]))
        ]
        if found:
            yield found
        if len(page) < _SCAN_PAGE:
            return
        start = f"({page[-1][0]}"


# --- Erase a user --------------------------------------------------------------------------------


def user_erasure_submit(*, user: EndUser) -> MemoryRequest:
    """Start erasing the user: from now on they are not found; the `batch` lane does the rest.
    Asking again returns the erasure already under way."""
    with transaction.atomic():
        locked = EndUser.objects.select_for_update().get(pk=user.pk)
        if locked.erasing_since is None:
            locked.erasing_since = timezone.now()
            locked.save(update_fields=["erasing_since"])
        live = _erasure_of(user_id=str(user.pk))
        if live is not None:
            return live
        now = timezone.now()
        memory_request = MemoryRequest.objects.create(
            tenant_id=user.tenant_id,
            kind=MemoryRequest.Kind.ERASURE,
            request_hash=hashlib.sha256(f"erase:{user.pk}".encode()).hexdigest(),
            payload={"user_id": str(user.pk)},
            sent_at=now,  # sent on commit, just below (memories.ledger: known-lost resends)
            expires_at=now + timedelta(seconds=settings.MEMORY_REQUEST_TTL_SECONDS),
        )
        transaction.on_commit(
            lambda: dispatch.request_send(
                request_id=str(memory_request.id), kind=memory_request.kind, priority="normal"
            ),
            robust=True,
        )
    return memory_request


def _erasure_of(*, user_id: str) -> MemoryRequest | None:
    return (
        MemoryRequest.objects.filter(kind=MemoryRequest.Kind.ERASURE, payload__user_id=user_id)
        .order_by("-created_at")
        .first()
    )


def user_erasure_run(*, request_id: str) -> str:
    """Run one erasure (see `jobs.request_run`); every step is safe to run again after a crash."""
    return request_run(request_id=request_id, work=user_erasure_work)


def user_erasure_work(claim: ledger.Claim, memory_request: MemoryRequest) -> None:
    user_id = memory_request.payload["user_id"]
    tenant_id = memory_request.tenant_id
    receipt: dict[str, int] = dict((memory_request.result or [{}])[0])

    def counted(kind: str, number: int) -> None:
        receipt[kind] = receipt.get(kind, 0) + number

    # What the user wrote into the tenant's shared or topic scopes belongs to the tenant: it stays,
    # with no user (its history keeps the actor that wrote it, an agent's name, not the person).
    with transaction.atomic():
        detached = Memory.objects.filter(user_id=user_id).exclude(scope=Memory.Scope.USER)
        counted("shared_memories_detached", detached.update(user=None))
    memories = f"SELECT id FROM {Memory._meta.db_table} WHERE user_id = %s LIMIT {CHUNK}"
    while ids := _ids(memories, [user_id]):
        with transaction.atomic():
            counted("history", _delete(MemoryHistory, "memory_id = ANY(%s)", [ids]))
            counted("memories", _delete(Memory, "id = ANY(%s)", [ids]))
            ledger.batch_request_record_progress(claim=claim, result=[receipt])
    sessions = f"SELECT id FROM {Session._meta.db_table} WHERE user_id = %s LIMIT {CHUNK}"
    while ids := _ids(sessions, [user_id]):
        with transaction.atomic():
            counted("messages", _delete(Message, "session_id = ANY(%s)", [ids]))
            counted("sessions", _delete(Session, "id = ANY(%s)", [ids]))
    requests = f"SELECT id FROM {MemoryRequest._meta.db_table} WHERE user_id = %s LIMIT {CHUNK}"
    while ids := _ids(requests, [user_id]):
        counted("requests", _delete(MemoryRequest, "id = ANY(%s)", [ids]))
    counted("batch_items_scrubbed", _batch_items_scrub(tenant_id=tenant_id, user_id=user_id))
    counted("outbox", _delete_raw(
        OutboxEvent._meta.db_table, "payload->'source'->>'user_id' = %s", [user_id]
    ))  # fmt: skip
    for kind, scrubbed in _event_copies_scrub(
        tenant_id=tenant_id, payload__source__user_id=user_id
    ).items():
        counted(kind, scrubbed)
    counted("stream_entries", _stream_entries_remove(
        tenant_id=str(tenant_id),
        matches=lambda event: event.get("source", {}).get("user_id") == user_id,
    ))  # fmt: skip
    with transaction.atomic():
        user = EndUser.objects.filter(pk=user_id).first()
        if user is not None:
            user.delete()
            signals.memories_cleared.send(
                sender=EndUser,
                tenant_id=tenant_id,
                user_id=user_id,
                count=receipt.get("memories", 0),
                reason="user erased",
            )
        ledger.memory_request_mark_success(claim=claim, result=[receipt])


def _ids(sql: str, params: list[Any]) -> list[Any]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def _delete(model: type[Any], condition: str, params: list[Any]) -> int:
    return _delete_raw(model._meta.db_table, condition, params)


def _delete_raw(table: str, condition: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE {condition}", params)
        return cursor.rowcount


def _batch_items_scrub(*, tenant_id: Any, user_id: str) -> int:
    """The user's items in the tenant's batch requests lose their content and metadata."""
    scrubbed = 0
    batches = MemoryRequest.objects.filter(
        tenant_id=tenant_id,
        kind=MemoryRequest.Kind.BATCH,
        payload__items__contains=[{"user_id": user_id}],
    ).only("pk", "payload")
    for batch in batches.iterator(chunk_size=100):
        items = [
            _item_scrubbed(item) if isinstance(item, dict) and item.get("user_id") == user_id
            else item
            for item in batch.payload["items"]
        ]  # fmt: skip
        MemoryRequest.objects.filter(pk=batch.pk).update(payload={"items": items})
        scrubbed += 1
    return scrubbed
