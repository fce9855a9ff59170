"""Erasing a user, on the `batch` lane."""

from __future__ import annotations

from celery import shared_task

from memories.dispatch import ERASURE_TASK
from memories.erasure import user_erasure_run
from tasks.retrying import finish_request_task


@shared_task(
    name=ERASURE_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # attempts are bounded in the database (MEMORY_JOB_MAX_ATTEMPTS)
)
def erase_user(self, request_id: str) -> str:
    """Erase one user, chunk by chunk; every step can run again, so a redelivery after a crash
    finishes the job and a finished one is a no-op."""
    return finish_request_task(self, user_erasure_run(request_id=request_id))
