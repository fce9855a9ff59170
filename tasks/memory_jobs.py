"""Memory jobs. The task is a doorbell: PostgreSQL holds the job, the task only names it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery import shared_task

from tasks.batch_jobs import apply_batch_request
from tasks.queues import MEMORY_JOB_TASK, Queue, finish_request_task, lane_for

if TYPE_CHECKING:
    from memories.models import MemoryRequest

logger = logging.getLogger(__name__)


def enqueue_memory_request(memory_request: MemoryRequest) -> None:
    """Send the request's task on its lane, named after the request (duplicates are visible).

    Called on commit. If the broker is unreachable the request stays `pending` and the sweeper
    sends it later, so a failure here is logged, never raised into the HTTP response.
    """
    queue = lane_for(memory_request.kind, memory_request.priority)
    task = apply_batch_request if queue is Queue.BATCH else process_memory_request
    try:
        task.apply_async(
            args=[str(memory_request.id)],
            task_id=str(memory_request.id),
            queue=queue.value,
            # Celery sends a task for a queue with a direct exchange (it makes the lanes'
            # queues so: no task_queues are configured) through the anonymous exchange, which on
            # Redis is an LPUSH onto the list named after the queue: no binding is read, so
            # nothing needs declaring. Declaring anyway cost a copy and bind of the queue entity
            # on every send. A topic or fanout exchange would need its binding: drop this then.
            declare=[],
        )
    except Exception:
        logger.exception("could not send memory request %s; the sweeper will", memory_request.id)


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
    exponential backoff until the attempts run out, then ends as `failure`.
    """
    from memories.pipeline import memory_request_run

    return finish_request_task(self, memory_request_run(request_id=request_id))
