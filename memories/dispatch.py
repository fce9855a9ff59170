"""Sending work to the Celery workers: the queues (one per workload), the lane a request's task
goes on, and a send by task name for each kind of work.

The web process and the services enqueue through here without importing `tasks/`: the workers
import that package and register its tasks under the names below, so the arrow points from the
tasks to this module, never back. The names are fixed strings, not a registry the tasks fill in
at import, so what a send does never depends on what happened to be imported first.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from memoryproject.celery import app

logger = logging.getLogger(__name__)


class Queue(StrEnum):
    HIGH = "high"  # corrections and high-priority jobs: never wait behind routine work
    DEFAULT = "default"  # memory jobs
    BATCH = "batch"  # bulk writes, bulk event publishing, webhook deliveries


# Each task's registered name (the `name=` of its decorator in tasks/).
MEMORY_JOB_TASK = "tasks.memory_jobs.process_memory_request"
BATCH_JOB_TASK = "tasks.batch_jobs.apply_batch_request"
PUBLISH_EVENTS_TASK = "tasks.events.publish_events"
DELIVER_WEBHOOK_TASK = "tasks.webhooks.deliver_webhook"
ERASURE_TASK = "tasks.erasure.erase_user"
# The tasks that run a request, sent with the request id as their task id.
REQUEST_TASKS = frozenset({MEMORY_JOB_TASK, BATCH_JOB_TASK, ERASURE_TASK})
_TASK_OF_KIND = {"batch": BATCH_JOB_TASK, "erasure": ERASURE_TASK}


def lane_for(kind: str, priority: str) -> Queue:
    """The lane a request's task is sent on, by the request's kind and priority."""
    if kind in ("batch", "erasure"):
        return Queue.BATCH
    return Queue.HIGH if priority == "high" else Queue.DEFAULT


def _send(
    name: str,
    *,
    args: list[Any],
    queue: Queue,
    task_id: str | None = None,
    countdown: float | None = None,
) -> None:
    app.send_task(
        name,
        args=args,
        task_id=task_id,
        queue=queue.value,
        countdown=countdown,
        # Celery sends a task for a queue with a direct exchange (it makes the lanes' queues so:
        # no task_queues are configured) through the anonymous exchange, which on Redis is an
        # LPUSH onto the list named after the queue: no binding is read, so nothing needs
        # declaring. Declaring anyway cost a copy and bind of the queue entity on every send. A
        # topic or fanout exchange would need its binding: drop this then.
        declare=[],
    )


def request_send(
    *, request_id: str, kind: str, priority: str, countdown: float | None = None
) -> bool:
    """Ring the worker for a recorded request, on its lane, with the request id as the task id
    (so duplicates are visible in the broker and the logs); after `countdown` seconds if given.
    Returns whether the broker took the message.

    Called on commit. If the broker is unreachable the request stays `pending` and the sweeper
    sends it later, so a failure here is logged, never raised into the HTTP response.
    """
    lane = lane_for(kind, priority)
    name = _TASK_OF_KIND.get(kind, MEMORY_JOB_TASK)
    try:
        _send(name, args=[request_id], queue=lane, task_id=request_id, countdown=countdown)
    except Exception:
        logger.exception("could not send memory request %s; the sweeper will", request_id)
        return False
    return True


def events_publish_send(*, outbox_ids: list[int]) -> None:
    """Hand committed outbox rows to the batch lane for publishing; raises if the broker is
    unreachable (the relay publishes them then)."""
    _send(PUBLISH_EVENTS_TASK, args=[outbox_ids], queue=Queue.BATCH)


def webhook_delivery_send(*, delivery_id: str) -> None:
    """Send a webhook delivery's task; raises if the broker is unreachable (the caller retries)."""
    _send(DELIVER_WEBHOOK_TASK, args=[delivery_id], queue=Queue.BATCH)
