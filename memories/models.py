from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.db.models import Func, Q
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField


def vector_text(values: list[float]) -> str:
    """A vector in pgvector's text form, `[0.1,0.2,...]`, which is what JSON writes for a list of
    floats: orjson does it in ~7 us for 384 dimensions, pgvector's own formatter in ~150."""
    return orjson.dumps(values).decode()


class EmbeddingField(VectorField):
    """pgvector's column, with lists of floats sent through `vector_text`.

    Its dimension is the embedder's (EMBEDDING_DIMENSIONS), kept out of the migrations: a new
    database gets the configured one, an existing one changes only by `manage.py reembed`, which
    re-embeds every memory first (memories.reembed). Left out of deconstruct(), a changed setting
    is no model change to makemigrations, and no migration ever alters a column full of vectors.
    """

    def __init__(self, *args: Any, dimensions: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, dimensions=dimensions or settings.EMBEDDING_DIMENSIONS, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("dimensions", None)
        return name, path, args, kwargs

    def get_prep_value(self, value: object) -> str | None:
        if isinstance(value, list):
            return vector_text(value)
        return super().get_prep_value(value)


class JsonTextField(models.JSONField):
    """JSON stored as PostgreSQL's `json` (the text, checked), not `jsonb`: for documents written
    once and read back whole, never queried inside (lookups into them do not work). Parsing into
    jsonb on every write and back to text on every read is then pure cost: 7 of the ~90 ms
    PostgreSQL spent per 1,000 batch writes went to the events' jsonb."""

    def db_type(self, connection: Any) -> str:
        return "json"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        # psycopg has parsed `json` already (Django has only `jsonb` handed over as text): a
        # string here is a JSON string, not a document to decode again.
        return value


class DateWords(Func):
    """A timestamp as the words a question uses for it, in UTC: "may 2025 wednesday".

    Built from EXTRACT and constant arrays rather than to_char, which PostgreSQL marks as only
    stable (it reads the locale): a generated column needs an immutable expression.
    """

    _MONTHS = "ARRAY['january','february','march','april','may','june','july','august',"
    _MONTHS += "'september','october','november','december']"
    _DAYS = "ARRAY['sunday','monday','tuesday','wednesday','thursday','friday','saturday']"
    template = (
        f"(({_MONTHS})[EXTRACT(MONTH FROM %(expressions)s AT TIME ZONE 'UTC')::int] || ' ' || "
        "EXTRACT(YEAR FROM %(expressions)s AT TIME ZONE 'UTC')::int::text || ' ' || "
        f"({_DAYS})[EXTRACT(DOW FROM %(expressions)s AT TIME ZONE 'UTC')::int + 1])"
    )
    output_field = models.TextField()


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """A bearer key of one tenant. Only its SHA-256 is stored; the key is shown once. Its role and
    grants say what it may do (memories.access)."""

    class Role(models.TextChoices):
        ADMIN = "admin"  # everything in its tenant
        AGENT = "agent"  # the users and topics it is granted (and the users it created)
        READ_ONLY = "read-only"  # an agent's reads, no writes

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, blank=True, default="")
    prefix = models.CharField(max_length=16, help_text="The first characters, to tell keys apart.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.ADMIN)
    # `user:<uuid>`, `topic:<name>`, `shared:write`, `*` (every user and topic); admins need none.
    grants = models.JSONField(default=list, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant})"

    def is_usable(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class EndUser(models.Model):
    """The person whose memories these are (not a login of this service)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="end_users")
    external_id = models.CharField(max_length=200, null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when the user's erasure is requested: from then on the user is not found (no new jobs,
    # reads, sessions) while the erasure job removes everything of theirs.
    erasing_since = models.DateTimeField(null=True, blank=True)
    # The key that created the user: an agent key may use the users it creates without a grant.
    created_by_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Set once the user has SEARCH_ANN_MIN_MEMORIES: from then on the user's rows go into the
    # approximate index and searches reach them through it (memories.ann_index, memories.nearest).
    # Never cleared: a trigger keeps it (migration 0020), whatever a stale save writes.
    ann_indexed = models.BooleanField(default=False, db_default=False)

    class Meta:
        verbose_name = "end user"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "external_id"],
                name="end_user_external_id_unique_per_tenant",
                condition=Q(external_id__isnull=False),
            ),
            # The target of memory_owner_fk (a memory's user and tenant together).
            models.UniqueConstraint(fields=["id", "tenant"], name="end_user_id_tenant_unique"),
        ]
        indexes = [
            # The few big users, for the refresh that moves their rows into the approximate index.
            models.Index(fields=["id"], name="end_user_ann_indexed", condition=Q(ann_indexed=True))
        ]

    def __str__(self) -> str:
        return self.external_id or str(self.id)


class MemoryRequest(models.Model):
    """One memory job: the ledger entry that Celery tasks only point at."""

    class Status(models.TextChoices):
        PENDING = "pending"
        PROCESSING = "processing"
        SUCCESS = "success"
        FAILURE = "failure"

    class Priority(models.TextChoices):
        NORMAL = "normal"
        HIGH = "high"

    class Kind(models.TextChoices):
        MEMORY_JOB = "memory_job"  # messages through the LLM pipeline, for one user
        BATCH = "batch"  # direct bulk writes, possibly for many users
        ERASURE = "erasure"  # a user erased; names the user in its payload, not as its owner

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memory_requests")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.MEMORY_JOB)
    # Empty for a batch, whose items may name many users, and an erasure (which outlives its user).
    user = models.ForeignKey(
        EndUser, null=True, blank=True, on_delete=models.CASCADE, related_name="memory_requests"
    )
    request_hash = models.CharField(max_length=64)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    # True while this request blocks an identical one: pending, processing, or succeeded and not
    # yet expired. The unique constraints below hold only over such rows, so the database, not a
    # read-then-write, decides which of two racing identical POSTs wins.
    holds_idempotency_slot = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    payload = models.JSONField()
    # Incremented at every claim: counts attempts (a poison job stops after N) and fences a
    # worker whose lease was taken over (its final write checks the value it claimed with).
    attempts = models.PositiveIntegerField(default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    result = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    # When its doorbell (the Celery task) was last handed to the broker: recorded with the
    # statement that precedes the send, taken back if the broker refused it. Empty: never handed
    # over. The sweeper compares it with the oldest message still queued in the request's lane to
    # tell a doorbell that was lost from one that waits its turn (memories.ledger).
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "request_hash"],
                name="memory_request_live_hash_unique",
                condition=Q(holds_idempotency_slot=True),
            ),
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                name="memory_request_live_idempotency_key_unique",
                condition=Q(holds_idempotency_slot=True, idempotency_key__isnull=False),
            ),
        ]
        indexes = [
            # The sweeper's scans: only unfinished rows are ever looked at.
            models.Index(
                fields=["status", "updated_at"],
                name="memory_request_unfinished",
                condition=Q(status__in=["pending", "processing"]),
            ),
            models.Index(
                fields=["expires_at"],
                name="memory_request_live_expiry",
                condition=Q(holds_idempotency_slot=True),
            ),
            # A user's memory jobs run one at a time, in order (memories.ledger): the user's
            # running job, and its oldest waiting one, are each one probe of this index.
            models.Index(
                fields=["user", "status", "created_at", "id"],
                name="memory_request_user_turn",
                condition=Q(kind="memory_job", status__in=["pending", "processing"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


# The approximate (HNSW) index over big users' rows (memories.ann_index, memories.nearest).
ANN_INDEX_NAME = "memory_embedding_ann"


class Memory(models.Model):
    class Scope(models.TextChoices):
        USER = "user"
        TENANT = "tenant"
        TOPIC = "topic"

    class Type(models.TextChoices):
        FACT = "fact"
        PREFERENCE = "preference"
        CONVERSATION = "conversation"
        LIST = "list"
        COUNTER = "counter"

    class MergeRule(models.TextChoices):
        LWW = "lww"  # the type's rule: last writer wins, or a list's / counter's merge
        MANUAL = "manual"  # a concurrent write is kept as a conflict

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Both kept by ONE composite foreign key, (user_id, tenant_id) -> end user (id, tenant_id),
    # added by migration 0006 (Django declares no composite foreign keys): it also holds a memory
    # to its user's tenant, and costs each inserted row one check instead of two, which showed
    # in bulk writes. The cascades are Django's, and need no constraint.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="memories", db_constraint=False
    )
    # No index of its own: memory_user_changes below leads with the user and serves its lookups.
    # Empty for a shared memory (scope tenant or topic) whose author was erased: it belongs to the
    # tenant and stays, detached from the person.
    user = models.ForeignKey(
        EndUser,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="memories",
        db_index=False,
        db_constraint=False,
    )
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.USER)
    topic = models.CharField(max_length=200, blank=True, default="")
    type = models.CharField(max_length=16, choices=Type.choices, default=Type.FACT)
    content = models.TextField()
    # Empty once the memory is forgotten (a tombstone keeps no trace of what it said).
    embedding = EmbeddingField(dimensions=settings.EMBEDDING_DIMENSIONS, null=True)
    # When what the memory records happened (a message's timestamp, an item's occurred_at), by
    # default when the write was accepted. Filters and keyword search use it.
    occurred_at = models.DateTimeField(default=timezone.now)
    # Set when a later statement contradicted the memory: it is closed, not erased. It leaves
    # list, search and sync's live set, and stays readable by id, in its history and by `as_of`.
    valid_to = models.DateTimeField(null=True, blank=True)
    # The content's lexemes (English stemming, stop words dropped) and its date's words ("may
    # 2025 wednesday"), for keyword retrieval; PostgreSQL keeps it in step with both on every
    # write, bulk COPY included.
    search_vector = models.GeneratedField(
        expression=SearchVector("content", config="english")
        + SearchVector(DateWords("occurred_at"), config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )
    content_hash = models.CharField(max_length=64)
    metadata = models.JSONField(default=dict, blank=True)
    agent_id = models.CharField(max_length=200, blank=True, default="")
    session_id = models.CharField(max_length=200, blank=True, default="")
    # Bumped on every change. The clock counts each agent's writes ({agent_id: n}): a write that
    # names the clock it was based on is concurrent with what happened since when neither
    # descends from the other, and is then merged by the memory's type (memories.versioned).
    version = models.PositiveIntegerField(default=1)
    vector_clock = models.JSONField(default=dict, blank=True)
    # The last write's time (the server's, or a client's earlier one for a write queued offline)
    # and agent: last-writer-wins orders concurrent writes by the pair.
    written_at = models.DateTimeField(default=timezone.now)
    written_by = models.CharField(max_length=200, blank=True, default="")
    # How a concurrent write is settled: by the type's rule, or kept as a conflict to resolve.
    merge_rule = models.CharField(max_length=8, choices=MergeRule.choices, default=MergeRule.LWW)
    conflicted = models.BooleanField(default=False)
    # A list's add-wins set or a counter's per-agent totals (memories.merges); empty otherwise.
    state = models.JSONField(default=dict, blank=True)
    # The key that created it: a shared memory has no owning user, its author is recorded.
    author_key_id = models.UUIDField(null=True, blank=True)
    # In the approximate (HNSW) index, a partial one: only the rows of users with many memories,
    # so no other write pays for it. Set by beat's refresh alone, never by a write (a write's rows
    # wait for the next refresh and are found meanwhile by the exact scan; memories.nearest); a
    # write that changes the row's vector clears it (the trigger of migration 0020).
    ann_indexed = models.BooleanField(default=False, db_default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # A tombstone rather than a row delete, so pull-sync can hand deletions to offline clients.
    deleted_at = models.DateTimeField(null=True, blank=True)
    # The id of the transaction that last wrote the row, set by a database trigger on every insert
    # and update (bulk ones included). Pull-sync pages on it: a transaction id below the oldest
    # running one can never gain rows later, so a cursor on it skips nothing (see selectors).
    change_txid = models.BigIntegerField(null=True, blank=True, editable=False)
    # Not stored: a search sets it on each result (1 - cosine distance).
    score: float

    class Meta:
        verbose_name_plural = "memories"
        indexes = [
            # A user's live rows, for lists and filtered searches (an exact scan of them: see
            # ARCHITECTURE.md); no global ANN index, which would drop a user's matches.
            models.Index(
                fields=["user", "created_at"],
                name="memory_user_live",
                condition=Q(deleted_at__isnull=True),
            ),
            GinIndex(fields=["metadata"], name="memory_metadata_gin"),
            GinIndex(fields=["search_vector"], name="memory_search_vector_gin"),
            # Pull-sync's order is (change_txid, id), but the id is left out of the key: the rows
            # one transaction writes for a user then share one key, which PostgreSQL keeps once
            # (B-tree deduplication). With the id every insert added an entry of its own: the
            # index was 71 MB for 731,000 memories (6.5 MB without), and took ~24 of the ~58 ms
            # PostgreSQL spent inserting 1,000 of them. A page sorts the rows of its
            # transactions by id (an incremental sort).
            models.Index(fields=["user", "change_txid"], name="memory_user_changes"),
            # A user's live rows outside the approximate index: a big user's newest (since the
            # last refresh), and every row of everyone else; the exact half of a search scans them.
            models.Index(
                fields=["user"],
                name="memory_user_unindexed",
                condition=Q(deleted_at__isnull=True, ann_indexed=False),
            ),
            # The approximate index over big users' live rows (see ann_indexed). A small user's
            # search never names ann_indexed, so PostgreSQL cannot take this index for it; a
            # forgotten or closed row leaves it. Built only where pgvector's HNSW takes the
            # column (at most 2,000 dimensions: memories.ann_index.ann_index_create).
            HnswIndex(
                fields=["embedding"],
                name=ANN_INDEX_NAME,
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
                condition=Q(ann_indexed=True, deleted_at__isnull=True, valid_to__isnull=True),
            ),
            # The shared memories of a tenant (scope tenant) and of its topics: listed, searched
            # and synced by these keys; a user's own memories have no entry.
            models.Index(
                fields=["tenant", "scope", "topic", "change_txid"],
                name="memory_shared_changes",
                condition=Q(user__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return self.content[:80]


class MemoryHistory(models.Model):
    """Append-only: every ADD / UPDATE / CLOSE / DELETE of a memory, with the content before and
    after."""

    class Event(models.TextChoices):
        ADD = "ADD"
        UPDATE = "UPDATE"
        DELETE = "DELETE"  # forgotten (erased) or a bulk delete
        CLOSE = "CLOSE"  # contradicted: no longer true, kept with its validity interval
        # A concurrent write that lost (last writer wins): its content, kept, not applied.
        OVERWRITTEN = "OVERWRITTEN"

    id = models.BigAutoField(primary_key=True)
    # Indexed by memory_history_by_memory (memory, id) alone; a second index would cost every
    # write of a memory another B-tree insertion.
    memory = models.ForeignKey(
        Memory, on_delete=models.CASCADE, related_name="history", db_index=False
    )
    event = models.CharField(max_length=16, choices=Event.choices)
    old_content = models.TextField(null=True, blank=True)
    new_content = models.TextField(null=True, blank=True)
    actor = models.CharField(max_length=200, blank=True, default="")
    # The API key behind the change (no foreign key: history outlives a deleted key).
    actor_key_id = models.UUIDField(null=True, blank=True)
    request = models.ForeignKey(
        MemoryRequest,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="history",
        db_index=False,  # memory_history_by_request below, which leaves out rows with no request
    )
    created_at = models.DateTimeField(default=timezone.now)
    # When the change became true (the memory's occurred_at for ADD and UPDATE, its valid_to for
    # CLOSE): an entry's content held from its occurred_at to the next entry's.
    occurred_at = models.DateTimeField(default=timezone.now)
    # Why a CLOSE happened: the statement that contradicted the memory.
    reason = models.TextField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "memory history"
        ordering = ["id"]
        indexes = [
            models.Index(fields=["memory", "id"], name="memory_history_by_memory"),
            # Batch writes and corrections have no request: no index entry for them.
            models.Index(
                fields=["request"],
                name="memory_history_by_request",
                condition=Q(request__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.memory_id}"


class MemoryConflict(models.Model):
    """A write to a `merge: manual` memory that was concurrent with another: not applied, both
    sides kept until someone chooses. Each side: content, version, clock, agent_id, written_at."""

    class Status(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="conflicts")
    memory = models.ForeignKey(Memory, on_delete=models.CASCADE, related_name="conflicts")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN)
    current = models.JSONField()
    incoming = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    # {"choose": "current"|"incoming"} or {"content": ...}, with who chose.
    resolution = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "status", "created_at"], name="conflict_by_status"),
        ]

    def __str__(self) -> str:
        return f"conflict {self.id} on {self.memory_id} ({self.status})"


class Session(models.Model):
    """A conversation of one user with an agent: its messages, and a summary once it ends."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="sessions")
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="sessions")
    agent_id = models.CharField(max_length=200, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    summary = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return str(self.id)


class Message(models.Model):
    id = models.BigAutoField(primary_key=True)
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16)
    content = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class OutboxEvent(models.Model):
    """An event written in the same transaction as the change it describes (transactional outbox).

    After commit it is published to the Redis Stream and channels; if that fails (Redis down,
    process killed between commit and publish) the beat relay publishes it later. So a committed
    change always emits, and a rolled-back one never does.
    """

    id = models.BigAutoField(primary_key=True)
    event_type = models.CharField(max_length=40)
    payload = JsonTextField()
    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    stream_id = models.CharField(max_length=40, blank=True, default="")

    class Meta:
        indexes = [
            models.Index(
                fields=["id"], name="outbox_unpublished", condition=Q(published_at__isnull=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} #{self.id}"


class AuditLogEntry(models.Model):
    """Append-only audit trail, written by the `audit` consumer group from the event stream.

    `event_id` is unique, so an event delivered twice (at-least-once delivery), or published twice
    (the relay sends again what a dying process had sent but not marked), is written once.
    """

    id = models.BigAutoField(primary_key=True)
    stream_id = models.CharField(max_length=40)
    event_id = models.UUIDField(unique=True)
    event_type = models.CharField(max_length=40)
    tenant_id = models.UUIDField(null=True, blank=True)
    user_id = models.UUIDField(null=True, blank=True)
    session_id = models.CharField(max_length=200, blank=True, default="")
    occurred_at = models.DateTimeField()
    payload = models.JSONField()
    recorded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "audit log"
        indexes = [
            models.Index(fields=["tenant_id", "occurred_at"], name="audit_by_tenant_time"),
            models.Index(fields=["user_id", "occurred_at"], name="audit_by_user_time"),
            # GET /v1/audit pages a tenant's entries newest first by id.
            models.Index(fields=["tenant_id", "-id"], name="audit_by_tenant_id"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.stream_id}"


class IdempotentWrite(models.Model):
    """A write sent with an `Idempotency-Key`, and the answer it got (memories.idempotency).

    The row is inserted before the write and its answer saved in the write's own transaction, so
    the two commit together: a duplicate sent while the first runs waits on the unique index, then
    finds the answer; one sent after a lost answer finds it too, and nothing is applied twice.
    """

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique (tenant, key) leads with it.
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_index=False)
    key = models.CharField(max_length=255)
    # sha256 of the method, path and body: the same key with another request is refused.
    fingerprint = models.CharField(max_length=64)
    # The first answer; empty only inside the transaction that is writing it.
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    body = JsonTextField(null=True, blank=True)
    headers = JsonTextField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "key"], name="idempotent_write_key_unique"),
        ]
        indexes = [models.Index(fields=["expires_at"], name="idempotent_write_expiry")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"


class SyncPurge(models.Model):
    """How far a tenant's tombstones have been purged (memories.sync): the greatest (change_txid,
    id) removed. A pull-sync cursor before it may have missed a deletion, so it is refused."""

    tenant = models.OneToOneField(
        Tenant, on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    purged_txid = models.BigIntegerField()
    purged_memory_id = models.UUIDField()
    purged_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.tenant_id} up to {self.purged_txid}"
