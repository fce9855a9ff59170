"""Reads of webhooks and their delivery log."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.db.models import Q, QuerySet

from memories.errors import NotFound
from memories.models import Tenant
from webhooks.models import Webhook, WebhookDelivery


def webhook_list(*, tenant: Tenant) -> QuerySet[Webhook]:
    return Webhook.objects.filter(tenant=tenant).order_by("created_at", "id")


def webhook_get(*, tenant: Tenant, webhook_id: UUID | str) -> Webhook:
    """The tenant's webhook, or NotFound: another tenant's is indistinguishable from none."""
    try:
        return Webhook.objects.get(tenant=tenant, pk=webhook_id)
    except (Webhook.DoesNotExist, ValueError) as exc:
        raise NotFound("Webhook not found.") from exc


def webhook_deliveries(*, webhook: Webhook, limit: int = 100) -> QuerySet[WebhookDelivery]:
    return webhook.deliveries.order_by("-created_at", "-id")[:limit]


def webhooks_matching(
    *, tenant_id: str, event_type: str, channels: list[str], occurred_at: datetime
) -> QuerySet[Webhook]:
    """Active webhooks of the tenant that want this event. A webhook gets only events that
    happened after it was created, so a consumer group replaying the stream sends no history."""
    return Webhook.objects.filter(
        Q(event_types=[]) | Q(event_types__contains=[event_type]),
        Q(channels=[]) | Q(channels__overlap=channels),
        tenant_id=tenant_id,
        active=True,
        created_at__lte=occurred_at,
    )
