"""Beat's sweeper: re-sends memory jobs whose doorbell was lost, releases expired statuses."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="tasks.sweeper.sweep_memory_requests", ignore_result=True)
def sweep_memory_requests() -> int:
    """Re-send stale `pending` and lease-expired `processing` requests; safe to run any time,
    any number of times: a resent job that is not claimable is a no-op in the worker."""
    from memories import services
    from tasks.memory_jobs import enqueue_memory_request

    due = services.memory_requests_due_for_resend()
    for memory_request in due:
        enqueue_memory_request(memory_request)
    expired = services.memory_requests_expire()
    if due or expired:
        logger.info("sweep: resent %d requests, expired %d", len(due), expired)
    return len(due)
