"""Beat's event chores: relay what the on-commit publish missed, trim the stream and the outbox."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone


@shared_task(name="tasks.events.relay_events", ignore_result=True)
def relay_events() -> int:
    """Publish committed events whose on-commit publish failed; each row is sent once."""
    from memories.events.publisher import relay_unpublished

    return relay_unpublished()


@shared_task(name="tasks.events.publish_events", ignore_result=True, acks_late=True)
def publish_events(ids: list[int]) -> int:
    """Publish a bulk write's events; rows already published are skipped, so a redelivery is
    harmless."""
    from memories.events.publisher import publish_outbox

    return publish_outbox(ids=ids)


@shared_task(name="tasks.events.trim_events", ignore_result=True)
def trim_events() -> int:
    """Trim the stream by age (MAXLEN caps its length on every write) and purge old outbox rows."""
    from memories.events.publisher import trim_stream
    from memories.models import OutboxEvent

    cutoff = timezone.now() - timedelta(seconds=settings.OUTBOX_RETENTION_SECONDS)
    OutboxEvent.objects.filter(published_at__lt=cutoff).delete()
    return trim_stream()
