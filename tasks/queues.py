"""The queues, one per workload, so each gets its own worker capacity."""

from enum import StrEnum
from typing import Any

from django.conf import settings


class Queue(StrEnum):
    HIGH = "high"  # corrections and high-priority jobs: never wait behind routine work
    DEFAULT = "default"  # memory jobs
    BATCH = "batch"  # bulk writes


# The tasks that run a request, sent with the request id as their task id (tasks.memory_jobs).
MEMORY_JOB_TASK = "tasks.memory_jobs.process_memory_request"
BATCH_JOB_TASK = "tasks.batch_jobs.apply_batch_request"


def lane_for(kind: str, priority: str) -> Queue:
    """The lane a request's task is sent on, by the request's kind and priority."""
    if kind == "batch":
        return Queue.BATCH
    return Queue.HIGH if priority == "high" else Queue.DEFAULT


def finish_request_task(task: Any, outcome: str) -> str:
    """The common end of a request task: count the outcome on its lane, and on `retry` send the
    task again with exponential backoff (the database bounds the attempts, not Celery)."""
    from memories.metrics import JOBS

    JOBS.labels(lane=task.request.delivery_info.get("routing_key") or "?", outcome=outcome).inc()
    if outcome == "retry":
        backoff = settings.MEMORY_JOB_RETRY_BACKOFF_SECONDS * 2**task.request.retries
        raise task.retry(countdown=backoff)
    return outcome
