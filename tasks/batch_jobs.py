"""Asynchronous bulk writes, on the `batch` lane."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings


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
    from memories.metrics import JOBS

    outcome = batch_request_run(request_id=request_id)
    JOBS.labels(lane="batch", outcome=outcome).inc()
    if outcome == "retry":
        raise self.retry(
            countdown=settings.MEMORY_JOB_RETRY_BACKOFF_SECONDS * 2**self.request.retries
        )
    return outcome
