"""Reads. Queries live here so views, tasks and the pipeline share one way of asking."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from django.db import connection
from django.db.models import Case, Count, F, OuterRef, Q, QuerySet, Subquery, When, Window
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce, Lead

from memories.dispatch import Queue, lane_for
from memories.errors import NotFound
from memories.filters import memory_filters_q
from memories.models import (
    ApiKey,
    AuditLogEntry,
    EndUser,
    Memory,
    MemoryConflict,
    MemoryHistory,
    MemoryRequest,
    Message,
    Session,
    SyncPurge,
    Tenant,
    vector_text,
)
from memories.nearest import user_nearest_sql


def end_user_get(*, tenant: Tenant, user_id: UUID | str) -> EndUser:
    """The tenant's user, or NotFound: another tenant's user is indistinguishable from none."""
    try:
        # A user being erased is not found: no reads, jobs or sessions for them any more.
        return EndUser.objects.get(tenant=tenant, pk=user_id, erasing_since__isnull=True)
    except (EndUser.DoesNotExist, ValueError, TypeError) as exc:
        raise NotFound("User not found.", field="user_id") from exc


def end_user_find(*, tenant: Tenant, external_id: str) -> EndUser | None:
    """The tenant's user with this external id (not one being erased), or None."""
    return EndUser.objects.filter(
        tenant=tenant, external_id=external_id, erasing_since__isnull=True
    ).first()


def memory_request_get(*, tenant: Tenant, request_id: UUID | str) -> MemoryRequest:
    try:
        return MemoryRequest.objects.get(tenant=tenant, pk=request_id)
    except (MemoryRequest.DoesNotExist, ValueError) as exc:
        raise NotFound("Request not found.") from exc


def memory_get(*, tenant: Tenant, memory_id: UUID | str) -> Memory:
    try:
        return Memory.objects.get(tenant=tenant, pk=memory_id, deleted_at__isnull=True)
    except (Memory.DoesNotExist, ValueError) as exc:
        raise NotFound("Memory not found.") from exc


def memory_owner(*, tenant: Tenant, memory_id: UUID | str) -> Memory:
    """Whose the tenant's memory is (its id, scope, user and topic only), tombstones included:
    what a key's rights over it are asked by (memories.access). NotFound otherwise."""
    try:
        return Memory.objects.only("id", "scope", "user_id", "topic").get(
            tenant=tenant, pk=memory_id
        )
    except (Memory.DoesNotExist, ValueError) as exc:
        raise NotFound("Memory not found.") from exc


def memory_history(
    *, tenant: Tenant, memory_id: UUID | str, after: int | None = None, limit: int = 100
) -> list[MemoryHistory]:
    """A page of the memory's history, oldest first, after the row `after` (a cursor)."""
    # History outlives a delete: the tombstoned memory's story (content-free) is still readable.
    if not Memory.objects.filter(tenant=tenant, pk=memory_id).exists():
        raise NotFound("Memory not found.")
    # Each entry's content held until the next entry's time; the window sees past the page's
    # LIMIT (applied after it), so the page's last entry gets its end too.
    rows = MemoryHistory.objects.filter(memory_id=memory_id).annotate(
        valid_to=Window(Lead("occurred_at"), order_by="id")
    )
    if after is not None:
        rows = rows.filter(id__gt=after)
    return list(rows.order_by("id")[:limit])


class UserKey(Protocol):
    """A user as a read needs it: an EndUser, or a user named by id and tenant not read yet
    (memories.search.UnreadUser)."""

    @property
    def id(self) -> Any: ...

    @property
    def tenant_id(self) -> Any: ...


def memory_pool_q(
    *,
    tenant_id: Any,
    user: UserKey | None,
    include_shared: bool,
    topics: Iterable[str] = (),
) -> Q:
    """The memories a view holds (a list, a search, a pull-sync, a digest): the user's own (when
    one is named), with `include_shared` the tenant's shared ones (scope tenant), and those of the
    `topics` named. Shared memories have no user; naming that keeps their lookups on the partial
    index memory_shared_changes."""
    pool = Q(pk__in=[])
    if user is not None:
        pool |= Q(user_id=user.id)
    if include_shared:
        pool |= Q(tenant_id=tenant_id, user__isnull=True, scope=Memory.Scope.TENANT)
    topics = sorted(set(topics))
    if topics:
        pool |= Q(
            tenant_id=tenant_id, user__isnull=True, scope=Memory.Scope.TOPIC, topic__in=topics
        )
    return pool


def memories_of(
    user: UserKey,
    *,
    filters: dict[str, Any],
    as_of: datetime | None = None,
    include_shared: bool = False,
    topics: Iterable[str] = (),
) -> QuerySet[Memory]:
    """The user's memories true now (live: neither forgotten nor closed), or, with `as_of`, those
    true then, each with `content_then` (its content at that time, from its history), filtered
    in SQL by the parsed filters; with the shared ones `memory_pool_q` adds."""
    pool = memory_pool_q(
        tenant_id=user.tenant_id, user=user, include_shared=include_shared, topics=topics
    )
    queryset = Memory.objects.filter(pool, deleted_at__isnull=True)
    if as_of is None:
        queryset = queryset.filter(valid_to__isnull=True)
    else:
        queryset = (
            queryset.filter(Q(valid_to__isnull=True) | Q(valid_to__gt=as_of))
            .annotate(content_then=content_then(as_of))
            .filter(content_then__isnull=False)
        )
    return queryset.filter(memory_filters_q(filters))


def content_then(as_of: datetime) -> Coalesce:
    """A memory's content at `as_of` (its latest ADD or UPDATE by then), NULL if it did not
    exist yet."""
    latest = (
        MemoryHistory.objects.filter(
            memory=OuterRef("pk"), occurred_at__lte=as_of, event__in=("ADD", "UPDATE")
        )
        .order_by("-occurred_at", "-id")
        .values("new_content")[:1]
    )
    # A memory written without history (none of the service's own paths) is its content.
    no_history = Case(When(occurred_at__lte=as_of, then=F("content")), default=None)
    return Coalesce(Subquery(latest), no_history)


def _shown_as_of(memories: Iterable[Memory], as_of: datetime | None) -> list[Memory]:
    """Memories read with `as_of` carry the content they had then."""
    memories = list(memories)
    if as_of is not None:
        for memory in memories:
            memory.content = getattr(memory, "content_then")  # noqa: B009 (an annotation)
    return memories


def memory_list(
    *,
    user: EndUser,
    filters: dict[str, Any],
    cursor: tuple[str, str] | None,
    limit: int,
    as_of: datetime | None = None,
    include_shared: bool = False,
    topics: Iterable[str] = (),
) -> list[Memory]:
    """A page of the user's live memories (or those true at `as_of`), newest first,
    keyset-paginated on (created_at, id); the shared ones too, as `memory_pool_q` says."""
    queryset = memories_of(
        user, filters=filters, as_of=as_of, include_shared=include_shared, topics=topics
    ).order_by("-created_at", "-id")
    if cursor is not None:
        created_at, memory_id = cursor
        queryset = queryset.filter(
            Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=memory_id)
        )
    return _shown_as_of(queryset.defer("embedding", "search_vector")[:limit], as_of)


def memory_nearest_for_many(
    *,
    user_id: UUID | str,
    vectors: list[list[float]],
    per_vector: int,
    tenant_id: UUID | str | None = None,
    scope: str = "user",
    topic: str = "",
) -> list[tuple[str, str]]:
    """The nearest live memories of the user (or, for a job writing shared memories, of the
    tenant's scope or topic) for every vector at once, in ONE query.

    Returns (memory_id, content) pairs, de-duplicated, closest first for the first vector, then the
    next, so the LLM sees each memory once.
    """
    if not vectors:
        return []
    literals = [vector_text(vector) for vector in vectors]
    kinds = "type IN ('fact', 'preference', 'conversation')"
    if scope == "user":
        # Exact for a small user, through the approximate index for a big one.
        nearest, params = user_nearest_sql(
            vector="f.vec::vector", vector_params=[], user_id=user_id, limit=per_vector,
            columns="id, content", where=kinds,
        )  # fmt: skip
        nearest = f"SELECT * FROM ({nearest}) AS halves ORDER BY distance, id LIMIT %s"
        params.append(per_vector)
    else:
        nearest = f"""
            SELECT id, content, embedding <=> f.vec::vector AS distance
            FROM {Memory._meta.db_table}
            WHERE tenant_id = %s AND user_id IS NULL AND scope = %s AND topic = %s
              AND deleted_at IS NULL AND valid_to IS NULL AND {kinds}
            ORDER BY distance
            LIMIT %s
        """
        params = [str(tenant_id), scope, topic, per_vector]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT f.ord, m.id, m.content
            FROM unnest(%s::text[]) WITH ORDINALITY AS f(vec, ord)
            CROSS JOIN LATERAL ({nearest}) AS m
            ORDER BY f.ord, m.distance
            """,
            [literals, *params],
        )
        rows = cursor.fetchall()
    seen: dict[str, str] = {}
    for _, memory_id, content in rows:
        seen.setdefault(str(memory_id), content)
    return list(seen.items())


def session_get(*, tenant: Tenant, session_id: UUID | str) -> Session:
    try:
        return Session.objects.get(tenant=tenant, pk=session_id)
    except (Session.DoesNotExist, ValueError) as exc:
        raise NotFound("Session not found.") from exc


def session_messages(*, session: Session, after: int | None, limit: int) -> list[Message]:
    """A page of the session's messages, oldest first, after the message `after` (a cursor)."""
    rows = Message.objects.filter(session=session)
    if after is not None:
        rows = rows.filter(id__gt=after)
    return list(rows.order_by("id")[:limit])


def _sync_set(
    *, tenant: Tenant | None, user: EndUser | None, shared: bool, topics: Iterable[str]
) -> Q:
    tenant_id = tenant.id if tenant is not None else user.tenant_id if user is not None else None
    return memory_pool_q(tenant_id=tenant_id, user=user, include_shared=shared, topics=topics)


def memory_changes_since(
    *,
    cursor: tuple[int, str] | None,
    limit: int,
    user: EndUser | None = None,
    tenant: Tenant | None = None,
    shared: bool = False,
    topics: Iterable[str] = (),
) -> list[Memory]:
    """The memories of the sets named (a user's, the tenant's shared ones, topics') written since
    `cursor`, deletions (tombstones) included, in the order they were written, for pull-sync.

    Pages on (writing transaction id, memory id). Only rows whose transaction id lies below the
    oldest transaction still running are returned: every such transaction has ended, so no row
    can later appear behind the cursor — a client never misses a change that committed late. The
    price: a change shows up once the transactions that began before it have finished. Each set
    is a range of its own index (memory_user_changes, memory_shared_changes), ORed by PostgreSQL.
    """
    settled = RawSQL("pg_snapshot_xmin(pg_current_snapshot())::text::bigint", [])
    covered = _sync_set(tenant=tenant, user=user, shared=shared, topics=topics)
    queryset = Memory.objects.filter(covered, change_txid__lt=settled)
    if cursor is not None:
        txid, memory_id = cursor
        # The first condition is implied by the second, but PostgreSQL cannot start an index
        # scan from an OR: without it every page read the user's whole history before the
        # cursor (80 ms at the 7,000th change; 0.2 ms with it).
        queryset = queryset.filter(change_txid__gte=txid).filter(
            Q(change_txid__gt=txid) | Q(change_txid=txid, id__gt=memory_id)
        )
    return list(queryset.order_by("change_txid", "id").defer("embedding", "search_vector")[:limit])


def memory_digest(
    *,
    user: EndUser | None = None,
    tenant: Tenant | None = None,
    shared: bool = False,
    topics: Iterable[str] = (),
) -> tuple[int, str]:
    """How many live memories (neither forgotten nor closed) the sets hold, and the sha256 (hex)
    of their `id:version` lines sorted by id, joined by newlines ("" when there are none): what a
    client's cache holds the same of. Computed in PostgreSQL, so no row travels."""
    live = Memory.objects.filter(
        _sync_set(tenant=tenant, user=user, shared=shared, topics=topics),
        deleted_at__isnull=True,
        valid_to__isnull=True,
    ).values_list("id", "version")
    sql, params = live.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT count(*), encode(sha256(convert_to(coalesce(string_agg(
                       live.id::text || ':' || live.version::text, E'\\n'
                       ORDER BY live.id::text COLLATE "C"), ''), 'UTF8')), 'hex')
            FROM ({sql}) AS live (id, version)
            """,
            params,
        )
        count, digest = cursor.fetchone()
    return count, digest


def sync_purged_through(*, tenant_id: UUID | str) -> tuple[int, UUID] | None:
    """The greatest (change_txid, id) of the tenant's purged tombstones (memories.sync), or None
    when none was ever purged: a pull-sync cursor before it may have missed a deletion."""
    mark = SyncPurge.objects.filter(tenant_id=tenant_id).first()
    return None if mark is None else (mark.purged_txid, mark.purged_memory_id)


def memory_request_list(
    *,
    tenant: Tenant,
    status: str | None,
    user_id: UUID | None,
    before: str | None,
    limit: int,
) -> list[MemoryRequest]:
    """The tenant's requests, newest first; `status=failure` is the dead-letter list."""
    queryset = MemoryRequest.objects.filter(tenant=tenant)
    if status:
        queryset = queryset.filter(status=status)
    if user_id:
        queryset = queryset.filter(user_id=user_id)
    if before:
        queryset = queryset.filter(created_at__lt=before)
    return list(queryset.order_by("-created_at", "-id").defer("payload")[:limit])


def conflict_get(*, tenant: Tenant, conflict_id: UUID | str) -> MemoryConflict:
    try:
        return MemoryConflict.objects.get(tenant=tenant, pk=conflict_id)
    except (MemoryConflict.DoesNotExist, ValueError) as exc:
        raise NotFound("Conflict not found.") from exc


def conflict_list(
    *,
    tenant: Tenant,
    status: str | None,
    memory_id: UUID | None,
    before: tuple[str, str] | None,
    limit: int,
) -> list[MemoryConflict]:
    """The tenant's conflicts (open ones unless `status` says), newest first, keyset-paginated
    on (created_at, id)."""
    queryset = MemoryConflict.objects.filter(tenant=tenant, status=status or "open")
    if memory_id is not None:
        queryset = queryset.filter(memory_id=memory_id)
    if before is not None:
        created_at, conflict_id = before
        queryset = queryset.filter(
            Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=conflict_id)
        )
    return list(queryset.order_by("-created_at", "-id")[:limit])


def api_key_list(*, tenant: Tenant) -> list[ApiKey]:
    """The tenant's keys, revoked ones too, newest first."""
    return list(ApiKey.objects.filter(tenant=tenant).order_by("-created_at", "-id"))


def api_key_get(*, tenant: Tenant, key_id: UUID | str) -> ApiKey:
    try:
        return ApiKey.objects.get(tenant=tenant, pk=key_id)
    except (ApiKey.DoesNotExist, ValueError) as exc:
        raise NotFound("Key not found.") from exc


def audit_list(
    *,
    tenant: Tenant,
    user_id: UUID | None = None,
    memory_id: UUID | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditLogEntry]:
    """The tenant's audit entries, newest first, before the entry `before` (a cursor)."""
    queryset = AuditLogEntry.objects.filter(tenant_id=tenant.id)
    if user_id:
        queryset = queryset.filter(user_id=user_id)
    if memory_id:
        queryset = queryset.filter(payload__memory__id=str(memory_id))
    if before is not None:
        queryset = queryset.filter(id__lt=before)
    return list(queryset.order_by("-id")[:limit])


# --- The staff dashboard's reads (every tenant is the staff's) -----------------------------------


def tenant_list() -> list[Tenant]:
    return list(Tenant.objects.order_by("name"))


def tenant_get(*, tenant_id: UUID | str) -> Tenant:
    try:
        return Tenant.objects.get(pk=tenant_id)
    except (Tenant.DoesNotExist, ValueError, TypeError) as exc:
        raise NotFound("Tenant not found.", field="tenant") from exc


def end_user_list(*, tenant: Tenant, limit: int = 200) -> list[EndUser]:
    """The tenant's users (not those being erased), newest first."""
    return list(
        EndUser.objects.filter(tenant=tenant, erasing_since__isnull=True).order_by(
            "-created_at", "-id"
        )[:limit]
    )


def memory_request_counts(*, tenant: Tenant) -> dict[str, dict[str, int]]:
    """The tenant's requests counted by status, then by the lane their task goes on (every status
    and lane present, zeros included)."""
    counts = {status: {lane.value: 0 for lane in Queue} for status in MemoryRequest.Status.values}
    rows = (
        MemoryRequest.objects.filter(tenant=tenant)
        .values_list("status", "kind", "priority")
        .annotate(count=Count("id"))
        .order_by()
    )
    for status, kind, priority, count in rows:
        counts[status][lane_for(kind, priority).value] += count
    return counts
