"""The common end of a task that runs a request: count its outcome, and retry it with backoff."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from memories.backoff import backoff_seconds
from memories.metrics import JOBS


def finish_request_task(task: Any, outcome: str) -> str:
    """Count the outcome on the task's lane; on `retry` send the task again after a jittered
    exponential backoff (the database bounds the attempts, not Celery)."""
    JOBS.labels(lane=task.request.delivery_info.get("routing_key") or "?", outcome=outcome).inc()
    if outcome == "retry":
        base = settings.MEMORY_JOB_RETRY_BACKOFF_SECONDS
        raise task.retry(countdown=backoff_seconds(base=base, attempt=task.request.retries))
    return outcome
