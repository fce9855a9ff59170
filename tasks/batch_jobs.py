"""Asynchronous bulk writes, on the `batch` lane."""

from __future__ import annotations

from celery import shared_task

from tasks.queues import finish_request_task


@shared_task(
    name="tasks.batch_jobs.apply_batch_request",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # attempts are bounded in the database (MEMORY_JOB_MAX_ATTEMPTS)
)
def apply_batch_request(self, request_id: str) -> str:
    """Apply one batch. Its writes and `success` commit together, so a redelivery after the
    commit is a no-op and a crash before it leaves nothing behind; failures retry with backoff."""
    from memories.batch import batch_request_run

    return finish_request_task(self, batch_request_run(request_id=request_id))
