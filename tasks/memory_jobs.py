"""Memory jobs. The task is a doorbell: PostgreSQL holds the job, the task only names it."""

from __future__ import annotations

from celery import shared_task

from memories.dispatch import MEMORY_JOB_TASK
from memories.pipeline import memory_request_run
from tasks.retrying import finish_request_task


@shared_task(
    name=MEMORY_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # attempts are bounded in the database (MEMORY_JOB_MAX_ATTEMPTS)
)
def process_memory_request(self, request_id: str) -> str:
    """Run one memory job.

    On redelivery (duplicate message, worker crash, sweeper resend) it is a no-op unless the
    request is still claimable; a failed attempt goes back to `pending` and is retried with
    exponential backoff until the attempts run out, then ends as `failure`. While an earlier job
    of the same user is unfinished, it runs that job instead (if it waits for its first attempt)
    or nothing: it is acknowledged at once, never waits, and is rung again when its turn comes.
    """
    return finish_request_task(self, memory_request_run(request_id=request_id))
