"""Writes. Every function here is the one place its change is made; views and tasks call these."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from psycopg.types.json import Jsonb

from memories import metrics, rows, selectors, signals
from memories.auth import hash_api_key
from memories.errors import (
    AlreadyExists,
    DuplicateRequest,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    VersionConflict,
)
from memories.models import (
    ApiKey,
    EndUser,
    Memory,
    MemoryHistory,
    MemoryRequest,
    Message,
    Session,
    Tenant,
)
from memories.providers import Embedder, LLMProvider
from memories.rows import json_bytes
from memories.validation import first_unstorable, unstorable_text
from tasks.memory_jobs import enqueue_memory_request

logger = logging.getLogger(__name__)


def content_hash(content: str) -> str:
    return hashlib.sha256(content.strip().lower().encode()).hexdigest()


# --- Tenants, keys and users ---------------------------------------------------------------------


def tenant_get_or_create(*, name: str) -> Tenant:
    tenant, _ = Tenant.objects.get_or_create(name=name)
    return tenant


def api_key_create(
    *, tenant: Tenant, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key; return it with its raw value, which is never stored nor shown again."""
    raw_key = f"mem_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=raw_key[:12],
        key_hash=hash_api_key(raw_key),
        expires_at=expires_at,
    )
    return api_key, raw_key


def end_user_create(
    *, tenant: Tenant, external_id: str | None = None, metadata: dict[str, Any] | None = None
) -> EndUser:
    try:
        with transaction.atomic():
            return EndUser.objects.create(
                tenant=tenant, external_id=external_id, metadata=metadata or {}
            )
    except IntegrityError as exc:
        raise AlreadyExists(
            f"A user with external_id {external_id!r} already exists.", field="external_id"
        ) from exc


@transaction.atomic
def end_user_delete(*, user: EndUser) -> int:
    """Delete a user with all their memories, requests and history; returns memories removed."""
    removed = Memory.objects.filter(user=user).count()
    signals.memories_cleared.send(
        sender=EndUser,
        tenant_id=user.tenant_id,
        user_id=user.id,
        count=removed,
        reason="user deleted",
    )
    user.delete()
    return removed


# --- Memory jobs ---------------------------------------------------------------------------------


def memory_request_hash(*, user_id: Any, payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what makes two jobs the same job."""
    identity = {
        "user_id": str(user_id),
        "messages": payload["messages"],
        "metadata": payload.get("metadata") or {},
        "options": {
            "agent_id": payload.get("agent_id") or "",
            "session_id": payload.get("session_id") or "",
            "infer": payload.get("infer", True),
        },
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _release_expired_slots(
    *, tenant_id: Any, user_id: Any, request_hash: str, idempotency_key: str | None
) -> None:
    expired = MemoryRequest.objects.filter(
        holds_idempotency_slot=True, expires_at__lte=timezone.now()
    )
    expired.filter(user_id=user_id, request_hash=request_hash).update(holds_idempotency_slot=False)
    if idempotency_key:
        expired.filter(tenant_id=tenant_id, idempotency_key=idempotency_key).update(
            holds_idempotency_slot=False
        )


def memory_request_submit(
    *,
    tenant_id: Any,
    user_id: Any,
    payload: dict[str, Any],
    priority: str = MemoryRequest.Priority.NORMAL,
    idempotency_key: str | None = None,
) -> MemoryRequest:
    """Record a memory job for the tenant's user and ring the worker once the row is committed.

    Raises NotFound (naming `user_id`) when the tenant has no such user; DuplicateRequest when
    the same job (same user and body, or same Idempotency-Key and body) is pending, processing or
    succeeded and not expired; IdempotencyKeyReused when the key is live with a different body.
    Exactly one of two racing identical submissions wins: the partial unique constraints decide.
    """
    request_hash = memory_request_hash(user_id=user_id, payload=payload)
    now = timezone.now()
    memory_request = MemoryRequest(
        tenant_id=tenant_id,
        user_id=user_id,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        priority=priority,
        payload=payload,
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(seconds=settings.MEMORY_REQUEST_TTL_SECONDS),
    )
    slot = {"tenant_id": tenant_id, "user_id": user_id, "request_hash": request_hash}
    # The insert alone is one statement and needs no transaction (BEGIN and COMMIT would be two
    # more round trips on every job); with a session, its messages are recorded in the same one.
    with transaction.atomic() if payload.get("session_id") else nullcontext():
        if not _memory_request_insert(memory_request):
            if not EndUser.objects.filter(pk=user_id, tenant_id=tenant_id).exists():
                raise NotFound("User not found.", field="user_id")
            # A slot is taken. Expiry is lazy: a request past its TTL stops blocking a duplicate
            # the moment one arrives, without waiting for the beat sweep; then try once more.
            _release_expired_slots(**slot, idempotency_key=idempotency_key)
            if not _memory_request_insert(memory_request):
                _raise_for_live_duplicate(**slot, idempotency_key=idempotency_key)
                # The duplicate finished between the insert and the lookup: it may be resent.
                raise DuplicateRequest("An identical request was just finished; send it again.")
        _session_record_job_messages(user_id=user_id, payload=payload)
        transaction.on_commit(lambda: enqueue_memory_request(memory_request), robust=True)
    return memory_request


# The insert of a job, guarded in the same statement: it takes place only if the tenant has the
# user (so the API needs no read of the user first), and not at all while a live request holds
# its idempotency slot (the partial unique indexes; DO NOTHING instead of an error, so no
# savepoint is needed around it).
_TENANT_HAS_USER = (
    f"EXISTS (SELECT 1 FROM {EndUser._meta.db_table} WHERE id = %s AND tenant_id = %s)"
)


def _memory_request_insert(memory_request: MemoryRequest) -> bool:
    """Insert the request; False when the tenant has no such user or its slot is taken."""
    inserted = rows.insert_rows(
        MemoryRequest,
        [rows.instance_row(memory_request)],
        returning="id",
        condition=_TENANT_HAS_USER,
        condition_params=[memory_request.user_id, memory_request.tenant_id],
        on_conflict="DO NOTHING",
    )
    if inserted:
        memory_request._state.adding = False
    return bool(inserted)


def _session_record_job_messages(*, user_id: Any, payload: dict[str, Any]) -> None:
    """A job naming an open session of its user adds its messages to that session's record."""
    session_id = payload.get("session_id")
    try:
        session = Session.objects.filter(
            pk=uuid.UUID(session_id), user_id=user_id, ended_at__isnull=True
        ).first()
    except (TypeError, ValueError):
        return
    if session is not None:
        session_add_messages(session=session, messages=payload["messages"])


def _raise_for_live_duplicate(
    *, tenant_id: Any, user_id: Any, request_hash: str, idempotency_key: str | None
) -> None:
    live = MemoryRequest.objects.filter(holds_idempotency_slot=True)
    if idempotency_key:
        by_key = live.filter(tenant_id=tenant_id, idempotency_key=idempotency_key).first()
        if by_key is not None and by_key.request_hash != request_hash:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used with a different request body.",
                request_id=str(by_key.id),
            )
        if by_key is not None:
            raise DuplicateRequest(
                "This request was already accepted.",
                request_id=str(by_key.id),
                status=by_key.status,
            )
    original = live.filter(user_id=user_id, request_hash=request_hash).first()
    if original is not None:
        raise DuplicateRequest(
            "This request was already accepted.",
            request_id=str(original.id),
            status=original.status,
        )


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a request: `token` is the attempt number it claimed with, `request` the
    row as the claim left it (so the work need not read it again)."""

    request_id: str
    token: int
    request: MemoryRequest = field(compare=False, repr=False)


# The common case of a claim in one round trip: the row changes only if it is claimable, and
# PostgreSQL re-checks the condition after waiting on a concurrent claim's lock, so of two
# racing workers exactly one gets a row back.
_CLAIM_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table}
    SET status = 'processing', attempts = attempts + 1, lease_until = %(lease_until)s,
        updated_at = %(now)s
    WHERE id = %(id)s AND attempts < %(max_attempts)s
      AND (status = 'pending'
           OR (status = 'processing' AND (lease_until IS NULL OR lease_until <= %(now)s)))
    RETURNING {rows.select_columns(MemoryRequest)}
"""


def memory_request_claim(*, request_id: str) -> Claim | None:
    """Take the request for processing, or return None when there is nothing to do.

    Claimable: `pending`, or `processing` whose lease ran out (its worker died). Anything else is a
    duplicate delivery and a no-op. A request that already used all its attempts ends as
    `failure` here, so a job that keeps killing its worker stops looping.
    """
    try:
        uuid.UUID(str(request_id))
    except ValueError:
        # A poison message: recorded in the log and acknowledged, never retried.
        logger.error("task named %r, which is not a request id; dropped", request_id)
        return None
    now = timezone.now()
    params = {
        "id": request_id,
        "now": now,
        "lease_until": now + timedelta(seconds=settings.MEMORY_JOB_LEASE_SECONDS),
        "max_attempts": settings.MEMORY_JOB_MAX_ATTEMPTS,
    }
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return _claim_refused(request_id=request_id, now=now)
    claimed = rows.instance_from_row(MemoryRequest, row)
    return Claim(request_id=str(claimed.id), token=claimed.attempts, request=claimed)


def _claim_refused(*, request_id: str, now: datetime) -> Claim | None:
    """Why the one-statement claim took nothing: the request is missing, finished, held by a live
    lease, or out of attempts (then it ends as `failure`). Re-checked under the row lock, since
    the state may have moved on since the UPDATE."""
    with transaction.atomic():
        memory_request = MemoryRequest.objects.select_for_update().filter(pk=request_id).first()
        if memory_request is None:
            logger.warning("memory request %s does not exist; delivery dropped", request_id)
            return None
        status = memory_request.status
        lease_lapsed = memory_request.lease_until is None or memory_request.lease_until <= now
        if not (
            status == MemoryRequest.Status.PENDING or (status == "processing" and lease_lapsed)
        ):
            return None
        if memory_request.attempts >= settings.MEMORY_JOB_MAX_ATTEMPTS:
            last_error = memory_request.error or "the worker stopped while running it"
            _finish_failure(
                memory_request,
                f"Gave up after {memory_request.attempts} attempts; last error: {last_error}",
            )
            return None
        memory_request.status = MemoryRequest.Status.PROCESSING
        memory_request.attempts += 1
        memory_request.lease_until = now + timedelta(seconds=settings.MEMORY_JOB_LEASE_SECONDS)
        memory_request.save(update_fields=["status", "attempts", "lease_until", "updated_at"])
        return Claim(
            request_id=str(memory_request.id), token=memory_request.attempts, request=memory_request
        )


def memory_request_renew_lease(*, claim: Claim) -> bool:
    """Extend the lease; False means it was taken over and the worker must not commit."""
    renewed = MemoryRequest.objects.filter(
        pk=claim.request_id, status=MemoryRequest.Status.PROCESSING, attempts=claim.token
    ).update(lease_until=timezone.now() + timedelta(seconds=settings.MEMORY_JOB_LEASE_SECONDS))
    return renewed == 1


def _finish_failure(memory_request: MemoryRequest, error: str) -> None:
    # A batch keeps the results of the chunks it committed (batch.batch_request_work).
    is_batch = memory_request.kind == MemoryRequest.Kind.BATCH
    applied = len(memory_request.result or []) if is_batch else 0
    if applied:
        total = len(memory_request.payload["items"])
        error = f"{applied} of {total} items applied; the admin's retry applies the rest. {error}"
    memory_request.status = MemoryRequest.Status.FAILURE
    memory_request.error = error[:4000]
    memory_request.lease_until = None
    memory_request.finished_at = timezone.now()
    # A failed request may be sent again: it stops blocking duplicates. Not a batch applied in
    # part, though: sent again, that part would be applied twice.
    memory_request.holds_idempotency_slot = applied > 0
    memory_request.save()
    signals.error_occurred.send(
        sender=MemoryRequest,
        tenant_id=memory_request.tenant_id,
        user_id=memory_request.user_id,
        error=memory_request.error,
        request_id=str(memory_request.id),
    )


def memory_request_record_error(*, claim: Claim, error: str) -> bool:
    """Record a failed attempt. Returns True when the request will be retried (back to `pending`),
    False when it is final (`failure`) or the claim was lost meanwhile."""
    with transaction.atomic():
        memory_request = (
            MemoryRequest.objects.select_for_update()
            .filter(
                pk=claim.request_id, status=MemoryRequest.Status.PROCESSING, attempts=claim.token
            )
            .first()
        )
        if memory_request is None:
            return False
        if memory_request.attempts >= settings.MEMORY_JOB_MAX_ATTEMPTS:
            _finish_failure(
                memory_request, f"Failed after {memory_request.attempts} attempts: {error}"
            )
            return False
        memory_request.status = MemoryRequest.Status.PENDING
        memory_request.error = error[:4000]
        memory_request.lease_until = None
        memory_request.save(update_fields=["status", "error", "lease_until", "updated_at"])
        return True


def memory_request_retry(*, memory_request: MemoryRequest) -> MemoryRequest:
    """Send a failed request again (the admin's retry): a fresh set of attempts, and a fresh
    idempotency window, unless another live request took its place meanwhile (DuplicateRequest:
    the partial unique indexes decide, as for a new request). A batch that failed part way
    resumes after the chunks it applied."""
    with transaction.atomic():
        locked = MemoryRequest.objects.select_for_update().get(pk=memory_request.pk)
        if locked.status != MemoryRequest.Status.FAILURE:
            return locked
        locked.status = MemoryRequest.Status.PENDING
        locked.attempts = 0
        locked.error = ""
        locked.finished_at = None
        locked.holds_idempotency_slot = True
        locked.expires_at = timezone.now() + timedelta(seconds=settings.MEMORY_REQUEST_TTL_SECONDS)
        try:
            with transaction.atomic():
                locked.save()
        except IntegrityError:  # the same user and body, or the same key, is live again
            raise DuplicateRequest("An identical request is live already.") from None
        transaction.on_commit(lambda: enqueue_memory_request(locked), robust=True)
    return locked


def memory_requests_due_for_resend(*, now: datetime | None = None) -> list[MemoryRequest]:
    """Requests whose doorbell was lost: `pending` past the grace period (broker lost the message,
    or the process died between commit and publish), and `processing` whose lease ran out."""
    now = now or timezone.now()
    grace = now - timedelta(seconds=settings.MEMORY_PENDING_GRACE_SECONDS)
    due = list(
        MemoryRequest.objects.filter(
            Q(status=MemoryRequest.Status.PENDING, updated_at__lt=grace)
            | Q(status=MemoryRequest.Status.PROCESSING, lease_until__lt=now)
        ).order_by("created_at")[:1000]
    )
    # Touch them so the next sweep waits another grace period before sending again.
    MemoryRequest.objects.filter(
        pk__in=[r.pk for r in due], status=MemoryRequest.Status.PENDING
    ).update(updated_at=now)
    return due


def memory_requests_expire(*, now: datetime | None = None) -> int:
    """Stop expired requests from blocking duplicates; their status stays readable."""
    return MemoryRequest.objects.filter(
        holds_idempotency_slot=True, expires_at__lte=now or timezone.now()
    ).update(holds_idempotency_slot=False)


# --- Memories ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedChange:
    """One change the pipeline decided, with UUIDs already mapped back from the LLM's integers."""

    event: str  # ADD | UPDATE | DELETE
    memory_id: str | None
    content: str | None
    embedding: list[float] | None


class LeaseLost(Exception):
    """Another worker took the request over; this worker's changes must not commit."""


_FINISH_SUCCESS_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table}
    SET status = 'success', result = %(result)s, error = '', lease_until = NULL,
        finished_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""


def memory_request_mark_success(*, claim: Claim, result: list[dict[str, Any]]) -> None:
    """Mark the claimed request `success` with its result. Call it inside the transaction that
    did its writes, so they and `success` commit together or not at all: it is fenced by the
    claim token, and raises LeaseLost (rolling that transaction back) when another worker took
    the request over. One statement by hand: it ends every job, and the ORM's update cost more
    than the write."""
    _fenced_result_write(_FINISH_SUCCESS_SQL, claim=claim, result=result)


def _fenced_result_write(sql: str, *, claim: Claim, result: list[dict[str, Any]]) -> None:
    params = {
        "id": claim.request_id,
        "token": claim.token,
        "now": timezone.now(),
        "result": Jsonb(result, dumps=json_bytes),
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if cursor.rowcount != 1:
            raise LeaseLost(claim.request_id)


_RECORD_PROGRESS_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table} SET result = %(result)s, updated_at = %(now)s
    WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""


def batch_request_record_progress(*, claim: Claim, result: list[dict[str, Any]]) -> None:
    """Record the results of the chunks of a batch applied so far, inside the transaction of the
    last of them; fenced by the claim like `memory_request_mark_success` (LeaseLost)."""
    _fenced_result_write(_RECORD_PROGRESS_SQL, claim=claim, result=result)


def batch_request_submit(
    *, tenant: Tenant, items: list[Any], idempotency_key: str | None = None
) -> MemoryRequest:
    """Record an asynchronous batch; the `batch` lane applies it. Same Idempotency-Key semantics
    as memory jobs (a batch has no single user, so only the key deduplicates it). Raises
    InvalidInput (naming `items`) for an item PostgreSQL could not store: the items are kept as
    they are until the lane applies them."""
    for index, item in enumerate(items):
        # Field by field, as the lane will check them (a field's own depth, not the item's).
        fields = item if isinstance(item, dict) else {"item": item}
        problem = unstorable_text(list(fields))
        if problem is None and (found := first_unstorable(fields)):
            problem = found[1]
        if problem:
            raise InvalidInput(f"Item {index}: {problem}", field="items")
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    request_hash = hashlib.sha256(canonical.encode()).hexdigest()
    now = timezone.now()
    with transaction.atomic():
        if idempotency_key:
            MemoryRequest.objects.filter(
                tenant=tenant,
                idempotency_key=idempotency_key,
                holds_idempotency_slot=True,
                expires_at__lte=now,
            ).update(holds_idempotency_slot=False)
        try:
            with transaction.atomic():
                memory_request = MemoryRequest.objects.create(
                    tenant=tenant,
                    kind=MemoryRequest.Kind.BATCH,
                    request_hash=request_hash,
                    idempotency_key=idempotency_key,
                    payload={"items": items},
                    expires_at=now + timedelta(seconds=settings.MEMORY_REQUEST_TTL_SECONDS),
                )
        except IntegrityError:
            live = MemoryRequest.objects.filter(
                tenant=tenant, idempotency_key=idempotency_key, holds_idempotency_slot=True
            ).first()
            if live is None:
                raise
            if live.request_hash != request_hash:
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was used with a different request body.",
                    request_id=str(live.id),
                ) from None
            raise DuplicateRequest(
                "This request was already accepted.", request_id=str(live.id), status=live.status
            ) from None
        transaction.on_commit(lambda: enqueue_memory_request(memory_request), robust=True)
    return memory_request


def memory_request_complete(*, claim: Claim, changes: list[PlannedChange]) -> list[dict[str, Any]]:
    """Apply the changes, their history, their events and `success` in ONE transaction, fenced by
    the claim.

    A crash before the commit leaves the request claimable again; after it, a redelivered task
    finds `success` and does nothing. Raises LeaseLost when the claim was taken over (the last
    statement checks the claim token, so nothing of this attempt commits).
    """
    with transaction.atomic():
        result = _apply_changes(memory_request=claim.request, changes=changes)
        memory_request_mark_success(claim=claim, result=result)
    return result


def _apply_changes(
    *, memory_request: MemoryRequest, changes: list[PlannedChange]
) -> list[dict[str, Any]]:
    """Write a job's changes. Returns the request's result entries, in decision order."""
    payload = memory_request.payload
    now = timezone.now()
    target_ids = [c.memory_id for c in changes if c.event != "ADD"]
    targets: dict[str, Memory] = {}
    if target_ids:  # the memories to change, locked (a job of ADDs alone needs no round trip)
        targets = _user_memories_lock(user_id=memory_request.user_id, memory_ids=target_ids)
    applied: list[AppliedChange] = []
    for change in changes:
        if change.event == "ADD":
            memory = Memory(
                tenant_id=memory_request.tenant_id,
                user_id=memory_request.user_id,
                content=change.content,
                embedding=change.embedding,
                content_hash=content_hash(change.content),
                metadata=payload.get("metadata") or {},
                agent_id=payload.get("agent_id") or "",
                session_id=payload.get("session_id") or "",
                created_at=now,
                updated_at=now,
            )
            applied.append(AppliedChange("ADD", memory, None))
            continue
        memory = targets.get(change.memory_id)
        if memory is None:
            # Deleted or changed by someone else since the decision was made: nothing to apply.
            logger.info("memory %s vanished before %s; skipped", change.memory_id, change.event)
            continue
        previous = memory.content
        if change.event == "UPDATE":
            _memory_set_content(memory, content=change.content, embedding=change.embedding)
        else:
            memory.deleted_at = now
        applied.append(AppliedChange(change.event, memory, previous))
    _memories_write(
        applied, actor=payload.get("agent_id") or "memory-job", request=memory_request, at=now
    )
    return [
        {
            "event": change.event,
            "memory_id": str(change.memory.id),
            "content": None if change.event == "DELETE" else change.memory.content,
            "previous_content": change.previous,
        }
        for change in applied
    ]


@dataclass(frozen=True)
class AppliedChange:
    """A change about to be written: the memory as it will be, and its content before."""

    event: str  # ADD | UPDATE | DELETE
    memory: Memory
    previous: str | None


def _memory_set_content(memory: Memory, *, content: str, embedding: list[float]) -> None:
    memory.content = content
    memory.embedding = embedding
    memory.content_hash = content_hash(content)


def _memories_write(
    applied: list[AppliedChange],
    *,
    actor: str,
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
        memory.version += 1
        memory.updated_at = at
        changed[memory.id] = {
            "id": memory.id,
            "content": memory.content,
            "content_hash": memory.content_hash,
            "metadata": memory.metadata,
            "deleted_at": memory.deleted_at,
            "version": memory.version,
            "updated_at": at,
        }
        # Locked memories are read without their embedding; one is written only if the change
        # set it (assigning a deferred field loads it into the instance).
        if "embedding" not in memory.get_deferred_fields():
            changed[memory.id]["embedding"] = memory.embedding
    # No save(): post_save would record the events one at a time; they are recorded together
    # below, through the memories_written signal.
    rows.update_rows(Memory, list(changed.values()))
    rows.insert_instances([change.memory for change in applied if change.event == "ADD"])
    _history_insert(applied, actor=actor, request=request, at=at)
    signals.memories_written.send(
        sender=Memory,
        changes=[(change.memory, _EVENT_TYPE_OF[change.event]) for change in applied],
    )


_EVENT_TYPE_OF = {"ADD": "memory.created", "UPDATE": "memory.updated", "DELETE": "memory.deleted"}


def memories_create_direct(
    *, memory_request: MemoryRequest, texts: list[str], embedder: Embedder
) -> list[PlannedChange]:
    """`infer: false`: every message becomes a memory as it is, with no LLM call."""
    with metrics.timed("embedding"):
        vectors = embedder.embed(texts) if texts else []
    return [
        PlannedChange(event="ADD", memory_id=None, content=text, embedding=vector)
        for text, vector in zip(texts, vectors, strict=True)
    ]


def _history_insert(
    applied: list[AppliedChange], *, actor: str, request: MemoryRequest | None, at: datetime
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
                "new_content": None if change.event == "DELETE" else change.memory.content,
                "actor": actor,
                "request_id": request_id,
                "created_at": at,
            }
            for change in applied
        ],
    )


# Memories are locked for a change without their embedding: a change replaces it or leaves it.
_LOCK_MEMORIES_SQL = f"""
    SELECT {rows.select_columns(Memory, exclude=("embedding",))} FROM {Memory._meta.db_table}
    WHERE deleted_at IS NULL AND {{condition}}
    FOR UPDATE
"""


def _live_memories_lock(condition: str, params: list[Any]) -> list[Memory]:
    """The live memories matching `condition` (SQL), row-locked for a change."""
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_MEMORIES_SQL.format(condition=condition), params)
        return [rows.instance_from_row(Memory, row, exclude=("embedding",)) for row in cursor]


def _memory_lock(*, tenant_id: Any, memory_id: Any) -> Memory:
    """The tenant's live memory, row-locked for a change; NotFound otherwise (another tenant's
    memory is indistinguishable from none)."""
    try:
        memory_id = uuid.UUID(str(memory_id))
    except ValueError:
        raise NotFound("Memory not found.") from None
    locked = _live_memories_lock("id = %s AND tenant_id = %s", [memory_id, tenant_id])
    if not locked:
        raise NotFound("Memory not found.")
    return locked[0]


def _user_memories_lock(*, user_id: Any, memory_ids: list[str]) -> dict[str, Memory]:
    """The user's live memories among these ids, row-locked for a change, by id."""
    locked = _live_memories_lock("id = ANY(%s::uuid[]) AND user_id = %s", [memory_ids, user_id])
    return {str(memory.id): memory for memory in locked}


def memory_update(
    *,
    tenant_id: Any,
    memory_id: Any,
    embedder: Embedder,
    content: str | None = None,
    metadata: dict[str, Any] | None = None,
    expected_version: int | None = None,
    actor: str = "api",
) -> Memory:
    """A correction, applied synchronously: embedding, update, history and event in one
    transaction, with one locking read of the memory.

    `expected_version` (from If-Match) guards against overwriting a change the caller has not
    seen: a stale version raises VersionConflict and changes nothing.
    """
    # Embedded before the lock is taken, so a slow embedder never holds the row.
    embedding = embedder.embed([content])[0] if content is not None else None
    with transaction.atomic():
        memory = _memory_lock(tenant_id=tenant_id, memory_id=memory_id)
        if expected_version is not None and memory.version != expected_version:
            raise VersionConflict(
                f"Memory is at version {memory.version}, not {expected_version}.",
                current_version=memory.version,
            )
        previous = memory.content
        if metadata is not None:
            memory.metadata = metadata
        if content is not None:
            _memory_set_content(memory, content=content, embedding=embedding)
        _memories_write([AppliedChange("UPDATE", memory, previous)], actor=actor, at=timezone.now())
    return memory


def memory_delete(*, tenant_id: Any, memory_id: Any, actor: str = "api") -> None:
    """Tombstone the memory (pull-sync hands the deletion to offline clients), with its history
    and event."""
    with transaction.atomic():
        memory = _memory_lock(tenant_id=tenant_id, memory_id=memory_id)
        previous = memory.content
        now = timezone.now()
        memory.deleted_at = now
        _memories_write([AppliedChange("DELETE", memory, previous)], actor=actor, at=now)


def memory_search(
    *,
    user: EndUser,
    query: str,
    limit: int,
    filters: dict[str, Any],
    threshold: float | None,
    embedder: Embedder,
) -> list[Memory]:
    """Search, and leave a `search.performed` event for audit and analytics."""
    results = selectors.memory_search(
        user=user,
        query_vector=embedder.embed([query])[0],
        limit=limit,
        filters=filters,
        threshold=threshold,
    )
    signals.search_performed.send(
        sender=Memory,
        tenant_id=user.tenant_id,
        user_id=user.id,
        query=query,
        results=len(results),
        agent_id=filters.get("agent_id", ""),
        session_id=filters.get("session_id", ""),
    )
    return results


# --- Sessions ------------------------------------------------------------------------------------


def session_start(
    *, user: EndUser, agent_id: str = "", metadata: dict[str, Any] | None = None
) -> Session:
    return Session.objects.create(
        tenant_id=user.tenant_id, user=user, agent_id=agent_id, metadata=metadata or {}
    )


@transaction.atomic
def session_add_messages(*, session: Session, messages: list[dict[str, str]]) -> list[Message]:
    """Append messages (each emits `message.added`); an ended session takes no more."""
    if session.ended_at is not None:
        raise InvalidInput("The session has ended.", field="session_id")
    return [
        Message.objects.create(session=session, role=m["role"], content=m["content"])
        for m in messages
    ]


def session_end(*, session: Session, summarize: bool, llm: LLMProvider | None = None) -> Session:
    """End a session (`session.ended`), optionally with a summary (`summary.created`).

    The summary is the facts the LLM extracts from the conversation, so it costs one model call and
    works with the offline provider too. Ending an ended session changes nothing.
    """
    summary = ""
    if summarize and llm is not None:
        conversation = [{"role": m.role, "content": m.content} for m in session.messages.all()]
        facts = llm.extract_facts(conversation) if conversation else []
        summary = "; ".join(facts) if facts else f"{len(conversation)} messages, no lasting facts."
    with transaction.atomic():
        locked = Session.objects.select_for_update().get(pk=session.pk)
        if locked.ended_at is not None:
            return locked
        locked.ended_at = timezone.now()
        locked.summary = summary
        locked.save(update_fields=["ended_at", "summary"])
        if summary:
            signals.summary_created.send(sender=Session, session=locked)
    return locked
