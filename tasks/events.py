"""Beat's event chores (relay what the on-commit publish missed, trim the stream and the outbox),
the batch lane's bulk publish, and the pool-process exit hook that marks what was published."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_process_shutdown

from memories.dispatch import PUBLISH_EVENTS_TASK
from memories.events.publisher import (
    flush_published_marks,
    outbox_purge,
    publish_outbox,
    relay_unpublished,
    trim_stream,
)


@shared_task(name="tasks.events.relay_events", ignore_result=True)
def relay_events() -> int:
    """Publish committed events whose on-commit publish failed; each row is sent once."""
    return relay_unpublished()


@shared_task(name=PUBLISH_EVENTS_TASK, ignore_result=True, acks_late=True)
def publish_events(ids: list[int]) -> int:
    """Publish a bulk write's events; rows already published are skipped, so a redelivery is
    harmless."""
    return publish_outbox(ids=ids)


@shared_task(name="tasks.events.trim_events", ignore_result=True)
def trim_events() -> int:
    """Trim the stream (by age, never what a consumer group still needs; see trim_stream) and
    purge old outbox rows."""
    outbox_purge()
    return trim_stream()


@worker_process_shutdown.connect(weak=False, dispatch_uid="flush_published_marks")
def _flush_published_marks(**kwargs: object) -> None:
    """A pool process ends with os._exit, past atexit: mark its published outbox rows first, or
    the relay sends their events a second time."""
    flush_published_marks()
