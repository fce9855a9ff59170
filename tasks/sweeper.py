"""Beat's sweeper: re-sends memory jobs whose doorbell is known lost, releases expired statuses."""

from __future__ import annotations

import logging

from celery import shared_task

from memories import ledger

logger = logging.getLogger(__name__)


@shared_task(name="tasks.sweeper.sweep_memory_requests", ignore_result=True)
def sweep_memory_requests() -> int:
    """Re-send `pending` requests whose doorbell is known lost (never handed to the broker, or
    gone from a lane that still holds later messages or none) and lease-expired `processing`
    ones; a request whose message waits in its lane is left to it, however long the backlog.
    Safe to run any time, any number of times: a resent job that is not claimable is a no-op in
    the worker."""
    resent = ledger.memory_requests_resend()
    expired = ledger.memory_requests_expire()
    if resent or expired:
        logger.info("sweep: resent %d requests, expired %d", resent, expired)
    return resent
