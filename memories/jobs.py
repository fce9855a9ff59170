"""Running a claimed request: the lease kept alive, the outcome, the retry bookkeeping.

Shared by every kind of request (memory jobs, batches): only the work differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from memories import dispatch, ledger, metrics
from memories.background import ProcessThread
from memories.backoff import backoff_seconds
from memories.logs import log_context
from memories.models import MemoryRequest
from memories.providers import ProviderError

logger = logging.getLogger(__name__)

Work = Callable[[ledger.Claim, MemoryRequest], None]


class _LeaseRenewer:
    """One background thread per process renews the leases of every job running in it.

    A thread per job would cost a thread start (and the wait for it to run) on every job; jobs
    are short next to the lease, so one thread that wakes every lease/3 serves them all.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[ledger.Claim, threading.Event] = {}
        self._thread = ProcessThread(self._run, name="lease-renewer")

    def add(self, claim: ledger.Claim) -> threading.Event:
        lost = threading.Event()
        with self._lock:
            self._claims[claim] = lost
        self._thread.ensure_running()
        return lost

    def remove(self, claim: ledger.Claim) -> None:
        with self._lock:
            self._claims.pop(claim, None)

    def _run(self) -> None:
        while True:
            time.sleep(max(settings.MEMORY_JOB_LEASE_SECONDS / 3, 0.2))
            with self._lock:
                claims = list(self._claims.items())
            for claim, lost in claims:
                with log_context(request_id=str(claim.request_id)):
                    self._renew(claim, lost)
            connection.close()  # back to the pool between rounds

    def _renew(self, claim: ledger.Claim, lost: threading.Event) -> None:
        try:
            if not ledger.memory_request_renew_lease(claim=claim):
                lost.set()
                self.remove(claim)
        except Exception:  # a renewal that fails only shortens the lease; the job goes on
            logger.exception("lease renewal for %s failed", claim.request_id)


_renewer = _LeaseRenewer()


@contextmanager
def lease_kept(claim: ledger.Claim) -> Iterator[threading.Event]:
    """Renew the claim's lease in the background while the job runs.

    Yields an Event that is set if the lease was lost (taken over by another worker), so the job
    can stop early; the final commit is fenced by the claim token either way.
    """
    lost = _renewer.add(claim)
    try:
        yield lost
    finally:
        _renewer.remove(claim)


def connection_release() -> None:
    """Give this thread's database connection back to the process's pool, before a wait that
    needs none (a model call). A `threads` worker runs dozens of jobs at once over a pool of about
    ten connections: a job that kept its connection across its model calls would hold the others
    up, so the pool, not the model, would bound the worker. Inside a transaction it does nothing
    (the transaction needs its connection). Taking one again costs a lock, not a new session."""
    if not connection.in_atomic_block:
        connection.close()


def request_run(*, request_id: str, work: Work) -> str:
    """Claim the request and do its work. Returns `done`, `skipped`, `retry` or `failed`.

    The claim may take another request than the named one (see `ledger.memory_request_claim`:
    its user's earlier job, or another tenant's under the fair claim), and `skipped` may mean the
    named job waits for its user's running one, which rings it when it ends.

    Safe to call any number of times for the same request: only a claim holder commits (the work
    must commit through a write fenced by the claim), and a finished request is never claimed
    again. Every failure counts as an attempt, so retries are bounded by MEMORY_JOB_MAX_ATTEMPTS.
    """
    with log_context(request_id=request_id):
        outcome = _run(request_id=request_id, work=work)
    return outcome


def _run(*, request_id: str, work: Work) -> str:
    try:
        claim = ledger.memory_request_claim(request_id=request_id)
    except DatabaseError:
        # Nothing was claimed, so no attempt is spent: the task retries with backoff instead of
        # being acknowledged and left for the sweeper.
        logger.exception("request %s: could not claim it; will retry", request_id)
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()
        return "retry"
    if claim is None:
        return "skipped"
    try:
        memory_request = claim.request
        with lease_kept(claim), metrics.timed("total", kind=memory_request.kind):
            if claim.token == 1:
                waited = (timezone.now() - memory_request.created_at).total_seconds()
                metrics.JOB_SECONDS.labels(stage="queue_wait", kind=memory_request.kind).observe(
                    waited
                )
            work(claim, memory_request)
    except ledger.LeaseLost:
        logger.warning("request %s: lease taken over; this attempt's work discarded", request_id)
        return "skipped"
    except Exception as exc:  # every failure is an attempt: bounded by MEMORY_JOB_MAX_ATTEMPTS
        logger.exception("request %s attempt %s failed", request_id, claim.token)
        # A killed database connection must not poison the next statement of this worker
        # (never close one that an enclosing transaction still holds, though).
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()
        error = _error_for_tenant(exc)
        # A provider that refused the request (a 4xx) will refuse it again: the job fails now.
        final = isinstance(exc, ProviderError) and not exc.retryable
        will_retry = ledger.memory_request_record_error(claim=claim, error=error, final=final)
        if will_retry and claim.request_id != request_id:
            _retry_send(claim)
        return "retry" if will_retry else "failed"
    return "done"


def _retry_send(claim: ledger.Claim) -> None:
    """This doorbell ran another request than the one it named (its user's earlier job, or the
    fair claim's pick from another tenant): the task's own retry names the wrong one, so the
    request that failed is rung after the same backoff. (The named one's retry finds nothing to
    do, or it is its turn then.)"""
    dispatch.request_send(
        request_id=claim.request_id,
        kind=claim.request.kind,
        priority=claim.request.priority,
        countdown=backoff_seconds(
            base=settings.MEMORY_JOB_RETRY_BACKOFF_SECONDS, attempt=claim.token - 1
        ),
    )


def _error_for_tenant(exc: Exception) -> str:
    """What the request's `error` says: a provider's failure in our providers' own words, any
    other failure by its kind alone (a driver's or library's text can carry what a tenant must
    not read; the log holds it)."""
    if isinstance(exc, ProviderError):
        return f"ProviderError: {exc}"
    return f"{type(exc).__name__}: the attempt failed; the service logged the cause"
