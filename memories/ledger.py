"""The request ledger: a memory job or batch is a row in PostgreSQL, and this module is the one
place that row changes: submit (with its idempotency slot), claim under a lease, renew, record an
error, retry, finish (success fenced by the claim), expire, and resend what the broker lost.

A request's state is the truth; the Celery task is only a doorbell that names the request
(`memories.dispatch`), so a lost or duplicated message never loses or repeats a job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone
from psycopg.types.json import Jsonb

from memories import dispatch, queue_load, rows, signals, timeseries
from memories.errors import DuplicateRequest, IdempotencyKeyReused, InvalidInput, NotFound
from memories.events.stream import requests_finished_announce
from memories.models import EndUser, MemoryRequest, Session, Tenant
from memories.rows import json_bytes
from memories.sessions import session_add_messages
from memories.validation import first_unstorable, unstorable_text

logger = logging.getLogger(__name__)


# Every doorbell's hand-over is recorded in `sent_at` by the statement that already precedes its
# send (the insert, the retry's save, the ring's lookup turned into an UPDATE ... RETURNING), so
# recording it costs no round trip; if the broker then refuses the message, the record is taken
# back. A process that dies between the record and the send leaves a hand-over that never
# happened: the lane's order still tells it was lost (`memory_requests_due_for_resend`).


def _ring(*, request_id: str, kind: str, priority: str, marked_at: datetime | None) -> None:
    """Send a request's doorbell, whose hand-over was recorded as `marked_at`; if the broker
    refused it, take the record back (unless a later send replaced it), so the sweeper sees a
    request that was never handed over."""
    if dispatch.request_send(request_id=request_id, kind=kind, priority=priority):
        return
    if marked_at is not None:
        MemoryRequest.objects.filter(pk=request_id, sent_at=marked_at).update(sent_at=None)


def _send_on_commit(memory_request: MemoryRequest) -> None:
    """Ring the worker once the transaction that recorded the request (and its `sent_at`)
    commits (at once outside one); a failed send leaves the request `pending` for the sweeper."""
    transaction.on_commit(
        lambda: _ring(
            request_id=str(memory_request.id),
            kind=memory_request.kind,
            priority=memory_request.priority,
            marked_at=memory_request.sent_at,
        ),
        robust=True,
    )


# The advisory locks' first key: this module's. A user's lock orders its claims, its jobs' ends
# and the insert of its jobs (see each).
_USER_LOCK_SPACE = 0x4D4A


def _user_lock_sql(user_id: str) -> str:
    """The statement that takes the user's lock until its transaction ends; `user_id` is the
    SQL naming the id (a placeholder)."""
    return f"SELECT pg_advisory_xact_lock({_USER_LOCK_SPACE}, hashtext({user_id}::uuid::text))"


# --- Submit --------------------------------------------------------------------------------------


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
        # Sent on commit, just below; or, while its user's other jobs are on their way, by the
        # end of the one ahead (which records its own hand-over).
        sent_at=now,
        expires_at=now + timedelta(seconds=settings.MEMORY_REQUEST_TTL_SECONDS),
    )
    slot = {"tenant_id": tenant_id, "user_id": user_id, "request_hash": request_hash}
    # The insert alone is one statement and needs no transaction (BEGIN and COMMIT would be two
    # more round trips on every job); with a session, its messages are recorded in the same one.
    with transaction.atomic() if payload.get("session_id") else nullcontext():
        others_on_their_way = _memory_request_insert(memory_request)
        if others_on_their_way is None:
            if not EndUser.objects.filter(
                pk=user_id, tenant_id=tenant_id, erasing_since__isnull=True
            ).exists():
                raise NotFound("User not found.", field="user_id")
            # A slot is taken. Expiry is lazy: a request past its TTL stops blocking a duplicate
            # the moment one arrives, without waiting for the beat sweep; then try once more.
            _release_expired_slots(**slot, idempotency_key=idempotency_key)
            others_on_their_way = _memory_request_insert(memory_request)
            if others_on_their_way is None:
                _raise_for_live_duplicate(**slot, idempotency_key=idempotency_key)
                # The duplicate finished between the insert and the lookup: it may be resent.
                raise DuplicateRequest("An identical request was just finished; send it again.")
        _session_record_job_messages(user_id=user_id, payload=payload)
        if not others_on_their_way:
            _send_on_commit(memory_request)
    return memory_request


# The insert of a job, guarded in the same statement: it takes place only if the tenant has the
# user (so the API needs no read of the user first), and not at all while a live request holds
# its idempotency slot (the partial unique indexes; DO NOTHING instead of an error, so no
# savepoint is needed around it).
_TENANT_HAS_USER = (
    f"EXISTS (SELECT 1 FROM {EndUser._meta.db_table}"
    " WHERE id = %s AND tenant_id = %s AND erasing_since IS NULL)"
)

# A job accepted while its user's other jobs are all on their way (running under a live lease,
# or pending with a doorbell handed over on a lane as fast as its own) gets no doorbell: its claim
# would find the user's turn taken and do nothing (a task delivered, two statements, for
# nothing), and the job ahead rings the user's oldest pending one when it ends. Otherwise it is
# rung as before, and its doorbell claims the job ahead: one that is stuck (its worker died, or
# the broker refused its doorbell) without waiting for the sweeper, and a `normal` one queued
# behind a backlog on the `high` job's lane. The insert tells which it was (one probe of
# `memory_request_user_turn`; the statement's snapshot holds no row of its own), under the user's
# lock, the one a job's end takes before it looks for the next job (`_FINISH_JOB_SQL`,
# `_users_next_send`): so either that look-up comes after this insert commits and sees it, or
# this insert's snapshot comes after the end committed and sees it ended. (A lease is compared
# with the new row's `created_at`: times here are the service's clock, not the database's.)
_NEW = MemoryRequest._meta.db_table  # in RETURNING, the table's name is the inserted row
_USERS_OTHER_JOBS_ON_THEIR_WAY = f"""coalesce((
    SELECT bool_and(CASE other.status
        WHEN 'pending' THEN other.sent_at IS NOT NULL
            AND (other.priority = {_NEW}.priority OR other.priority = 'high')
        ELSE coalesce(other.lease_until > {_NEW}.created_at, false) END)
    FROM {_NEW} AS other
    WHERE other.user_id = {_NEW}.user_id AND other.kind = 'memory_job'
      AND other.status IN ('pending', 'processing') AND other.id <> {_NEW}.id), false)"""


def _memory_request_insert(memory_request: MemoryRequest) -> bool | None:
    """Insert the request. None when the tenant has no such user or its slot is taken; else
    whether other memory jobs of its user are unfinished, all on their way (then this one
    needs no doorbell)."""
    inserted = rows.insert_rows(
        MemoryRequest,
        [rows.instance_row(memory_request)],
        returning=_USERS_OTHER_JOBS_ON_THEIR_WAY,
        condition=_TENANT_HAS_USER,
        condition_params=[memory_request.user_id, memory_request.tenant_id],
        on_conflict="DO NOTHING",
        preceded_by=_user_lock_sql("%s"),
        preceded_by_params=[memory_request.user_id],
    )
    if not inserted:
        return None
    memory_request._state.adding = False
    return bool(inserted[0])


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


# --- Claim, lease, finish ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a request: `token` is the attempt number it claimed with, `request` the
    row as the claim left it (so the work need not read it again)."""

    request_id: str
    token: int
    request: MemoryRequest = field(compare=False, repr=False)


# A user's memory jobs take effect one at a time, in the order they were accepted: each decides
# against what the earlier ones left. So a memory job's doorbell claims its user's turn, not its
# own row: the user's running job if its lease ran out, else the user's oldest pending job (the
# named one, or an earlier one whose doorbell was lost or is still queued; not an earlier one
# waiting out a retry's backoff: its own retry claims it). While the user's job runs, nothing is
# claimed: the doorbell is dropped, and the job that finishes rings the user's next one
# (`_users_next_send`), the sweeper being the safety net. (A job accepted while its user's other
# jobs are on their way is not rung at all: `_USERS_OTHER_JOBS_ON_THEIR_WAY`.) Batches and
# erasures keep their own row.
#
# Of two claimers of one user, exactly one may decide. Each takes a transaction-scoped advisory
# lock on the user, then (a fresh snapshot in READ COMMITTED) looks and claims: the two
# statements go in ONE round trip as one implicit transaction (a multi-statement query: Django's
# psycopg 3 cursors bind client-side, which allows it; server_side_binding would not), so the lock
# is held for well under a millisecond and never across the model calls. Without it, a job
# accepted concurrently with a later one could become visible just after the later one was
# claimed, and run beside it.
# Other users' claims never wait: the lock is per user. The two lookups are one probe each of
# the partial index `memory_request_user_turn`. A third statement in the same round trip reads the
# named request's state, which tells a refused claim that needs no locked re-check (most do not).

_CLAIM_SQL = f"""
    SELECT pg_advisory_xact_lock({_USER_LOCK_SPACE}, hashtext(user_id::text))
    FROM {MemoryRequest._meta.db_table}
    WHERE id = %(id)s AND kind = 'memory_job' AND user_id IS NOT NULL;

    WITH named AS (
        SELECT id, kind, user_id FROM {MemoryRequest._meta.db_table} WHERE id = %(id)s
    ), target AS (
        SELECT CASE WHEN named.kind <> 'memory_job' OR named.user_id IS NULL THEN named.id
        ELSE coalesce(
            (SELECT running.id FROM {MemoryRequest._meta.db_table} AS running
             WHERE running.user_id = named.user_id AND running.kind = 'memory_job'
               AND running.status = 'processing'
             ORDER BY running.created_at, running.id LIMIT 1),
            (SELECT waiting.id FROM {MemoryRequest._meta.db_table} AS waiting
             WHERE waiting.user_id = named.user_id AND waiting.kind = 'memory_job'
               AND waiting.status = 'pending'
             ORDER BY waiting.created_at, waiting.id LIMIT 1)
        ) END AS id
        FROM named
    )
    UPDATE {MemoryRequest._meta.db_table}
    SET status = 'processing', attempts = attempts + 1, lease_until = %(lease_until)s,
        updated_at = %(now)s
    WHERE id = (SELECT id FROM target) AND attempts < %(max_attempts)s
      AND ((status = 'pending' AND (id = %(id)s OR attempts = 0))
           OR (status = 'processing' AND (lease_until IS NULL OR lease_until <= %(now)s)))
    RETURNING {rows.select_columns(MemoryRequest)};

    SELECT kind, status, attempts, lease_until FROM {MemoryRequest._meta.db_table}
    WHERE id = %(id)s
"""

# A pending memory job is its user's turn when the user has no job running and none pending
# that was accepted earlier (two probes of `memory_request_user_turn`).
_USERS_TURN = f"""(
    {{job}}.kind <> 'memory_job' OR {{job}}.user_id IS NULL OR (
        NOT EXISTS (
            SELECT 1 FROM {MemoryRequest._meta.db_table} AS running
            WHERE running.user_id = {{job}}.user_id AND running.kind = 'memory_job'
              AND running.status = 'processing')
        AND NOT EXISTS (
            SELECT 1 FROM {MemoryRequest._meta.db_table} AS earlier
            WHERE earlier.user_id = {{job}}.user_id AND earlier.kind = 'memory_job'
              AND earlier.status = 'pending'
              AND (earlier.created_at, earlier.id) < ({{job}}.created_at, {{job}}.id))))"""


# Fair dispatch: the first-attempt request, of the same kind and priority, of the tenant that
# has the fewest requests running, if that is fewer than the named request's tenant has (and,
# for a memory job, if it is its user's turn). It runs before every claim, so it must stay cheap
# with hundreds of requests pending: the cheap tests (a tenant running nothing needs no fairer
# pick; another tenant, same lane, fewer running) go first, and the user's-turn probes run down
# the sorted candidates (a materialized CTE is scanned in the order it was written) until one
# passes. Written as a join with the users'-turn test in the same
# WHERE, PostgreSQL ran that test for every pending row before the tenant test, a probe of the
# pending rows each: 39 ms of server CPU a claim with 300 pending and 64 running.
_FAIRER_SQL = f"""
    WITH named AS MATERIALIZED (
        SELECT tenant_id, kind, priority FROM {MemoryRequest._meta.db_table} WHERE id = %(id)s
    ), running AS MATERIALIZED (
        SELECT tenant_id, count(*) AS n FROM {MemoryRequest._meta.db_table}
        WHERE status = 'processing' AND lease_until > %(now)s GROUP BY tenant_id
    ), ours AS MATERIALIZED (
        SELECT running.n FROM running JOIN named USING (tenant_id)
    ), candidates AS MATERIALIZED (
        SELECT candidate.id, candidate.kind, candidate.user_id, candidate.created_at,
               coalesce(theirs.n, 0) AS theirs_running
        FROM {MemoryRequest._meta.db_table} AS candidate
        JOIN named ON candidate.kind = named.kind AND candidate.priority = named.priority
            AND candidate.tenant_id <> named.tenant_id
        LEFT JOIN running AS theirs ON theirs.tenant_id = candidate.tenant_id
        WHERE candidate.status = 'pending' AND candidate.attempts = 0
          AND coalesce(theirs.n, 0) < (SELECT n FROM ours)
        ORDER BY theirs_running, candidate.created_at
    )
    SELECT candidate.id FROM candidates AS candidate
    WHERE {_USERS_TURN.format(job="candidate")}
    LIMIT 1
"""


# The named request is rung again when the fair claim took another: its hand-over recorded in the
# statement that reads what the send needs.
_MARK_SENT_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table} SET sent_at = %(now)s WHERE id = %(id)s
    RETURNING kind, priority
"""


def memory_request_claim(*, request_id: str) -> Claim | None:
    """Take a request for processing, or return None when there is nothing to do.

    In order within a user: a memory job is claimed only when no job of its user accepted
    earlier is unfinished; a doorbell for a later job claims the user's oldest pending one
    instead (so a lost message of an earlier job does not hold the user up), and while the user's
    job runs it claims nothing (the finishing job rings the user's next one). Other users, and
    batches and erasures, never wait on it.

    Fair across tenants: when another tenant with fewer requests running has one waiting (of the
    same kind and priority, not tried yet), that one is taken instead, and the named request is
    rung again at the back of its lane; so a tenant flooding a lane cannot hold every worker
    while others wait. Otherwise the named request is taken if claimable: `pending`, or
    `processing` whose lease ran out (its worker died); anything else is a duplicate delivery and
    a no-op. A request that already used all its attempts ends as `failure` here, so a job that
    keeps killing its worker stops looping.
    """
    try:
        uuid.UUID(str(request_id))
    except ValueError:
        # A poison message: recorded in the log and acknowledged, never retried.
        logger.error("task named %r, which is not a request id; dropped", request_id)
        return None
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_FAIRER_SQL, {"id": request_id, "now": now})
        fairer = cursor.fetchone()
    if fairer is not None and (claim := _claim_by_id(request_id=str(fairer[0]), now=now)):
        with connection.cursor() as cursor:
            cursor.execute(_MARK_SENT_SQL, {"id": request_id, "now": now})
            named = cursor.fetchone()
        if named is not None:
            _ring(request_id=request_id, kind=named[0], priority=named[1], marked_at=now)
        return claim
    return _claim_by_id(request_id=request_id, now=now, refused=_claim_refused)


def _claim_by_id(
    *,
    request_id: str,
    now: datetime,
    refused: Callable[..., Claim | None] | None = None,
) -> Claim | None:
    params: dict[str, Any] = {
        "id": request_id,
        "now": now,
        "lease_until": now + timedelta(seconds=settings.MEMORY_JOB_LEASE_SECONDS),
        "max_attempts": settings.MEMORY_JOB_MAX_ATTEMPTS,
    }
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, params)  # the user's lock, then the claim: see _CLAIM_SQL
        cursor.nextset()
        row = cursor.fetchone()
        cursor.nextset()
        named = cursor.fetchone()
    if row is None:
        if refused is None or _nothing_to_do(named, now=now):
            return None
        return refused(request_id=request_id, now=now)
    claimed = rows.instance_from_row(MemoryRequest, row)
    return Claim(request_id=str(claimed.id), token=claimed.attempts, request=claimed)


def _nothing_to_do(named: tuple[Any, ...] | None, *, now: datetime) -> bool:
    """The named request, as the claim's round trip read it after its UPDATE took nothing, is
    one that no claim may change: finished, held by a live lease, or a memory job with attempts
    left that waits its user's turn (the commonest: a user's later job rung while the earlier one
    runs). Then no locked re-check is needed (`_claim_refused`: three more statements)."""
    if named is None:
        return False
    kind, status, attempts, lease_until = named
    if status in (MemoryRequest.Status.SUCCESS, MemoryRequest.Status.FAILURE):
        return True
    if attempts >= settings.MEMORY_JOB_MAX_ATTEMPTS:
        return False  # it ends as `failure` under the lock
    if status == MemoryRequest.Status.PROCESSING:
        return lease_until is not None and lease_until > now
    return kind == MemoryRequest.Kind.MEMORY_JOB and status == MemoryRequest.Status.PENDING


def _claim_refused(*, request_id: str, now: datetime) -> Claim | None:
    """Why the one-statement claim took nothing: the request is missing, finished, held by a live
    lease, out of attempts (then it ends as `failure`), or a memory job whose user's turn it is
    not (its turn comes when the earlier job finishes and rings it). Re-checked under the row
    lock, since the state may have moved on since the UPDATE."""
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
        if memory_request.kind == MemoryRequest.Kind.MEMORY_JOB:
            # Its user's turn was decided under the user's lock: not this job's turn yet.
            return None
        memory_request.status = MemoryRequest.Status.PROCESSING
        memory_request.attempts += 1
        memory_request.lease_until = now + timedelta(seconds=settings.MEMORY_JOB_LEASE_SECONDS)
        memory_request.save(update_fields=["status", "attempts", "lease_until", "updated_at"])
        return Claim(
            request_id=str(memory_request.id), token=memory_request.attempts, request=memory_request
        )


def _request_finished_on_commit(memory_request: MemoryRequest) -> None:
    """Once a request's end (success or failure) commits: callers waiting on it are told
    (memories.request_waits), and a memory job hands its user's turn on, ringing the user's
    oldest pending job. After the commit, not in it: a job whose doorbell was dropped because
    this one still ran is then certain to be seen. If this send is lost, the sweeper rings that
    job after the grace period."""
    _announce_on_commit(memory_request)
    if memory_request.kind != MemoryRequest.Kind.MEMORY_JOB or memory_request.user_id is None:
        return
    user_id = memory_request.user_id
    transaction.on_commit(lambda: _users_next_send(user_id=user_id), robust=True)


def _announce_on_commit(memory_request: MemoryRequest) -> None:
    """Once the request's end commits: callers waiting on it are told, and the dashboard's
    per-second latency series gets its time from acceptance to the end (queueing included)."""
    request_id = str(memory_request.id)
    # Read from the instance's loaded fields only: a deferred one would cost a query a job.
    accepted_at = memory_request.__dict__.get("created_at")
    latency = None
    if accepted_at is not None:
        latency = partial(
            timeseries.job_finished, seconds=(timezone.now() - accepted_at).total_seconds()
        )
    transaction.on_commit(
        lambda: requests_finished_announce([request_id], also=latency), robust=True
    )


# The user's oldest pending job, found and marked as rung in one statement (one probe of
# `memory_request_user_turn`); a job claimed meanwhile is left alone, and not rung.
_USERS_NEXT_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table} SET sent_at = %(now)s
    WHERE status = 'pending' AND id = (
        SELECT id FROM {MemoryRequest._meta.db_table}
        WHERE user_id = %(user_id)s AND kind = 'memory_job' AND status = 'pending'
        ORDER BY created_at, id LIMIT 1)
    RETURNING id, kind, priority
"""


# Under the user's lock, like a job's success (`_FINISH_JOB_SQL`): a job of the user accepted
# meanwhile either is seen here or saw this end (`_USERS_OTHER_JOBS_ON_THEIR_WAY`).
_USERS_NEXT_LOCKED_SQL = f"""
    {_user_lock_sql("%(user_id)s")};
    {_USERS_NEXT_SQL}
"""


def _users_next_send(*, user_id: Any) -> None:
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_USERS_NEXT_LOCKED_SQL, {"user_id": user_id, "now": now})
        cursor.nextset()
        waiting = cursor.fetchone()
    if waiting is not None:
        _ring(request_id=str(waiting[0]), kind=waiting[1], priority=waiting[2], marked_at=now)


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
    _request_finished_on_commit(memory_request)
    signals.error_occurred.send(
        sender=MemoryRequest,
        tenant_id=memory_request.tenant_id,
        user_id=memory_request.user_id,
        error=memory_request.error,
        request_id=str(memory_request.id),
    )


def memory_request_record_error(*, claim: Claim, error: str, final: bool = False) -> bool:
    """Record a failed attempt. Returns True when the request will be retried (back to `pending`),
    False when it is final (`failure`: the attempts ran out, or `final` says another attempt
    cannot help) or the claim was lost meanwhile."""
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
        if final:
            _finish_failure(memory_request, f"Failed, not retried: {error}")
            return False
        if memory_request.attempts >= settings.MEMORY_JOB_MAX_ATTEMPTS:
            _finish_failure(
                memory_request, f"Failed after {memory_request.attempts} attempts: {error}"
            )
            return False
        memory_request.status = MemoryRequest.Status.PENDING
        memory_request.error = error[:4000]
        memory_request.lease_until = None
        # Its retry is sent right after (the task's own, or jobs' ring of the request it ran).
        memory_request.sent_at = timezone.now()
        update_fields = ["status", "error", "lease_until", "sent_at", "updated_at"]
        memory_request.save(update_fields=update_fields)
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
        locked.sent_at = timezone.now()  # sent on commit, just below
        try:
            with transaction.atomic():
                locked.save()
        except IntegrityError:  # the same user and body, or the same key, is live again
            raise DuplicateRequest("An identical request is live already.") from None
        _send_on_commit(locked)
    return locked


# --- Resending what was lost -------------------------------------------------------------------
#
# A request's doorbell may be lost: the broker refused it, the process died between the commit and
# the send, Redis restarted empty, a worker took it and died before recording anything. A doorbell
# that merely waits its turn in a lane is not lost, and ringing it again would only deepen the
# lane (which admission control measures) with a duplicate delivery: so the sweeper rings again
# only what is known lost. A lane is first in, first out: a message sent well before the oldest
# one still queued in its lane (or before now, when the lane is empty) has left the queue, and if
# no worker holds it (fetched, not yet acknowledged) and its request is still pending, nothing
# will run it.


def memory_requests_due_for_resend(*, now: datetime | None = None) -> list[MemoryRequest]:
    """Requests whose doorbell is known lost, and `processing` ones whose lease ran out.

    A `pending` request is due when its doorbell was never handed over (`sent_at` empty past the
    grace period MEMORY_PENDING_GRACE_SECONDS), or when it was sent a grace period before the
    oldest message still queued in its lane, or before now while its lane is empty, and no worker
    holds one of its messages (fetched within the grace period, or waiting out a countdown). One
    whose message is queued is never due, however old the backlog. A memory job waiting for an
    earlier job of its user is not rung: that job rings it when it ends (and if that ring is
    lost, this job is due at a sweep after). A `processing` request whose lease ran out is due
    once for that lapse, then again only when that ring is known lost the same way.
    """
    now = now or timezone.now()
    grace = timedelta(seconds=settings.MEMORY_PENDING_GRACE_SECONDS)
    # The broker first, then the rows: a request still pending after the broker was read, whose
    # message had left its lane by then and was held by no worker, was not run by that message.
    broker = queue_load.broker_view()
    sent_before_its_lane = _sent_before_oldest_queued(broker, now=now, grace=grace)
    never_handed_over = Q(sent_at__isnull=True, updated_at__lt=now - grace)
    rung_since_lapse = Q(sent_at__gt=F("lease_until"))
    candidates = MemoryRequest.objects.filter(
        Q(status=MemoryRequest.Status.PENDING)
        & (never_handed_over | sent_before_its_lane)
        & _users_turn()
        | Q(status=MemoryRequest.Status.PROCESSING, lease_until__lt=now)
        & (~rung_since_lapse | Q(sent_at__isnull=True) | sent_before_its_lane)
    ).order_by("created_at")[:1000]
    held_after = now - grace
    return [
        memory_request
        for memory_request in candidates
        if not _held(memory_request, broker=broker, after=held_after)
    ]


def _sent_before_oldest_queued(
    broker: queue_load.BrokerView, *, now: datetime, grace: timedelta
) -> Q:
    """Requests sent a grace period (for the clocks of the senders, and messages in flight)
    before the oldest message queued in their lane, or before now if it is empty. A lane whose
    oldest message carries no stamp tells nothing: none of its requests."""
    lost = Q(pk__in=[])
    for lane in dispatch.Queue:
        if lane.value in broker.empty:
            cutoff = now - grace
        elif (oldest := broker.oldest_sent[lane.value]) is not None:
            cutoff = min(now, oldest) - grace
        else:
            continue
        lost |= _on_lane(lane) & Q(sent_at__lt=cutoff)
    return lost


def _on_lane(lane: dispatch.Queue) -> Q:
    """The requests whose doorbell goes on `lane` (by `dispatch.lane_for`, the one rule)."""
    return functools.reduce(
        operator.or_,
        (
            Q(kind=kind, priority=priority)
            for kind in MemoryRequest.Kind.values
            for priority in MemoryRequest.Priority.values
            if dispatch.lane_for(kind, priority) == lane
        ),
        Q(pk__in=[]),
    )


def _held(memory_request: MemoryRequest, *, broker: queue_load.BrokerView, after: datetime) -> bool:
    """A worker holds one of the request's messages and is due to run it: fetched since `after`,
    or waiting out a countdown that ends after it. An older hold is a worker that died holding
    it (kombu hands such a message on only after the visibility timeout): not a hold. The first
    ring after a lease ran out is never held back: the message its dead worker held is old."""
    lapsed = memory_request.status == MemoryRequest.Status.PROCESSING
    if lapsed and (
        memory_request.sent_at is None
        or memory_request.lease_until is None
        or memory_request.sent_at <= memory_request.lease_until
    ):
        return False
    held_until = broker.held_until.get(str(memory_request.id))
    return held_until is not None and held_until > after


def _users_turn() -> Q:
    """The ORM's `_USERS_TURN`: not a memory job, or its user has none running and none pending
    that was accepted earlier."""
    users_jobs = MemoryRequest.objects.filter(
        user_id=OuterRef("user_id"), kind=MemoryRequest.Kind.MEMORY_JOB
    )
    running = users_jobs.filter(status=MemoryRequest.Status.PROCESSING)
    earlier = users_jobs.filter(
        # (created_at, id) < the job's, with a bound the index can seek to.
        Q(created_at__lt=OuterRef("created_at")) | Q(id__lt=OuterRef("id")),
        status=MemoryRequest.Status.PENDING,
        created_at__lte=OuterRef("created_at"),
    )
    return (
        ~Q(kind=MemoryRequest.Kind.MEMORY_JOB)
        | Q(user_id__isnull=True)
        | (~Exists(running) & ~Exists(earlier))
    )


def memory_requests_resend(*, now: datetime | None = None) -> int:
    """Send again every request whose doorbell is known lost (see
    `memory_requests_due_for_resend`); returns how many. Each ring's hand-over is recorded first,
    in one statement for all, so the next sweep does not ring it again while it waits in its
    lane. Safe to run any number of times: a resent request that is not claimable is a no-op in
    the worker."""
    due = memory_requests_due_for_resend(now=now)
    if not due:
        return 0
    marked_at = timezone.now()
    MemoryRequest.objects.filter(pk__in=[r.pk for r in due]).update(sent_at=marked_at)
    for memory_request in due:
        _ring(
            request_id=str(memory_request.id),
            kind=memory_request.kind,
            priority=memory_request.priority,
            marked_at=marked_at,
        )
    return len(due)


def memory_requests_expire(*, now: datetime | None = None) -> int:
    """Stop expired requests from blocking duplicates; their status stays readable."""
    return MemoryRequest.objects.filter(
        holds_idempotency_slot=True, expires_at__lte=now or timezone.now()
    ).update(holds_idempotency_slot=False)


class LeaseLost(Exception):
    """Another worker took the request over; this worker's changes must not commit."""


_FINISH_SUCCESS_SQL = f"""
    UPDATE {MemoryRequest._meta.db_table}
    SET status = 'success', result = %(result)s, error = '', lease_until = NULL,
        finished_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""


# A memory job's end and its user's next job in one round trip, inside the job's transaction: the
# user's lock first (so the order of locks is a claim's: a claimer takes it, then request rows),
# the fenced `success`, then the user's oldest pending job marked as rung. The lock, held until
# the commit, is what makes the look-up safe before the commit: a job of the user accepted
# meanwhile waits for the lock, then sees this job finished and is rung by its own insert; one
# accepted before is seen here. The doorbell is sent after the commit.
_FINISH_JOB_SQL = f"""
    {_user_lock_sql("%(user_id)s")};
    {_FINISH_SUCCESS_SQL} RETURNING id;
    {_USERS_NEXT_SQL}
"""


def memory_request_mark_success(*, claim: Claim, result: list[dict[str, Any]]) -> None:
    """Mark the claimed request `success` with its result. Call it inside the transaction that
    did its writes, so they and `success` commit together or not at all: it is fenced by the
    claim token, and raises LeaseLost (rolling that transaction back) when another worker took
    the request over. By hand: it ends every job, and the ORM's update cost more than the write.
    A memory job's user's next job is found in the same round trip and rung once this commits."""
    memory_request = claim.request
    if memory_request.kind != MemoryRequest.Kind.MEMORY_JOB or memory_request.user_id is None:
        _fenced_result_write(_FINISH_SUCCESS_SQL, claim=claim, result=result)
        _request_finished_on_commit(memory_request)
        return
    now = timezone.now()
    params: dict[str, Any] = {
        "id": claim.request_id,
        "token": claim.token,
        "now": now,
        "result": Jsonb(result, dumps=json_bytes),
        "user_id": memory_request.user_id,
    }
    with connection.cursor() as cursor:
        cursor.execute(_FINISH_JOB_SQL, params)
        cursor.nextset()
        if cursor.fetchone() is None:
            raise LeaseLost(claim.request_id)
        cursor.nextset()
        waiting = cursor.fetchone()
    _announce_on_commit(memory_request)
    if waiting is not None:
        next_id, kind, priority = str(waiting[0]), waiting[1], waiting[2]
        transaction.on_commit(
            lambda: _ring(request_id=next_id, kind=kind, priority=priority, marked_at=now),
            robust=True,
        )


def _fenced_result_write(sql: str, *, claim: Claim, result: list[dict[str, Any]]) -> None:
    """The one way a claimed request's result is written (its success, a batch's progress): the
    statement changes the row only while `claim` still holds it, else LeaseLost. Raw SQL
    because it runs on every job, and the ORM's update cost more CPU than the write itself."""
    params: dict[str, Any] = {
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


# --- Batches ------------------------------------------------------------------------------------


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
                    sent_at=now,  # sent on commit, just below
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
        _send_on_commit(memory_request)
    return memory_request
