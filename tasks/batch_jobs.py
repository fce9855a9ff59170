"""Asynchronous bulk writes, on the `batch` lane."""

from __future__ import annotations

from celery import shared_task

from memories.batch import batch_request_run
from memories.dispatch import BATCH_JOB_TASK
from tasks.retrying import finish_request_task


@shared_task(
    name=BATCH_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # attempts are bounded in the database (MEMORY_JOB_MAX_ATTEMPTS)
)
def apply_batch_request(self, request_id: str) -> str:
    """Apply one batch, BATCH_MAX_ITEMS items a transaction, each committed with the request's
    progress: a redelivery resumes after the last chunk committed (after the last, which commits
    `success`, it is a no-op), so no item is applied twice; failures retry with backoff."""
    return finish_request_task(self, batch_request_run(request_id=request_id))
