"""Writes: webhooks, their deliveries, and delivery attempts.

A delivery is a POST of the event as JSON, signed with the webhook's secret:

    X-Memory-Signature: sha256=<hex HMAC-SHA256(secret, f"{X-Memory-Timestamp}.{body}")>

Receivers should check the signature and the timestamp's age, and dedupe on X-Memory-Delivery:
delivery is at-least-once (a worker that dies after the POST and before recording it sends again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from memories import dispatch
from memories.backoff import backoff_seconds
from memories.errors import LimitReached
from memories.events.stream import StreamEntry
from memories.models import Tenant
from webhooks import selectors, targets
from webhooks.deadline import DeadlineTransport
from webhooks.models import Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

Status = WebhookDelivery.Status


def webhook_create(
    *, tenant: Tenant, url: str, event_types: list[str], channels: list[str]
) -> Webhook:
    """Create a webhook with a fresh signing secret (the caller shows it once); LimitReached
    past WEBHOOK_MAX_PER_TENANT (the tenant's row is locked, so two at once cannot both pass)."""
    with transaction.atomic():
        Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
        if Webhook.objects.filter(tenant=tenant).count() >= settings.WEBHOOK_MAX_PER_TENANT:
            raise LimitReached(
                f"A tenant may have {settings.WEBHOOK_MAX_PER_TENANT} webhooks; delete one first."
            )
        return Webhook.objects.create(
            tenant=tenant,
            url=url,
            secret=f"whsec_{secrets.token_urlsafe(32)}",
            event_types=event_types,
            channels=channels,
        )


def webhook_delete(*, webhook: Webhook) -> None:
    """Delete a webhook and its delivery log; its queued deliveries become no-ops."""
    webhook.delete()


def webhook_deliveries_create_for_event(*, stream_id: str, event: dict[str, Any]) -> int:
    """The `webhooks` consumer group's handler: one delivery per matching webhook, enqueued.

    Safe to run again for the same entry: the (webhook, event) constraint keeps one delivery, and
    deliveries not attempted yet are enqueued again (a send that failed last time); a duplicate
    task is a no-op (see `webhook_delivery_attempt`). Returns the deliveries enqueued.
    """
    tenant_id = (event.get("source") or {}).get("tenant_id")
    if not tenant_id:
        return 0
    webhooks = list(
        selectors.webhooks_matching(
            tenant_id=tenant_id,
            event_type=event["event_type"],
            channels=event.get("channels") or [],
            occurred_at=datetime.fromisoformat(event["timestamp"]),
        )
    )
    if not webhooks:
        return 0
    now = timezone.now()
    WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(webhook=webhook, event_id=event["event_id"], stream_id=stream_id,
                            payload=event, next_attempt_at=now)
            for webhook in webhooks
        ],
        ignore_conflicts=True,
    )  # fmt: skip
    waiting = list(
        WebhookDelivery.objects.filter(
            webhook__in=webhooks, event_id=event["event_id"], status=Status.PENDING, attempts=0
        ).values_list("id", flat=True)
    )
    for delivery_id in waiting:
        # Raises if the broker is down: the stream entry is handled again later.
        dispatch.webhook_delivery_send(delivery_id=str(delivery_id))
    return len(waiting)


def webhook_deliveries_create_for_events(entries: list[StreamEntry]) -> int:
    """`webhook_deliveries_create_for_event` for a whole read of the stream: one query finds the
    tenants that have an active webhook at all; only their events are decoded and matched one by
    one (a bulk write's thousand events cost one query when its tenant has none)."""
    tenants = {tenant_id for entry in entries if (tenant_id := entry.fields.get("tenant_id"))}
    if not tenants:
        return 0
    hooked = {
        str(tenant_id)
        for tenant_id in Webhook.objects.filter(tenant_id__in=tenants, active=True)
        .values_list("tenant_id", flat=True)
        .distinct()
    }
    return sum(
        webhook_deliveries_create_for_event(stream_id=entry.id, event=entry.event)
        for entry in entries
        if entry.fields.get("tenant_id") in hooked
    )


def sign(*, secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


@dataclass(frozen=True)
class AttemptOutcome:
    status: str  # a WebhookDelivery.Status after the attempt, or "noop" / "not_due"
    next_attempt_at: datetime | None = None


def webhook_delivery_attempt(*, delivery_id: str) -> AttemptOutcome:
    """Make one attempt at a delivery if one is due, and log it on the delivery row.

    Three steps, and no transaction is open while the receiver is called (a slow receiver would
    hold a worker's connection and PostgreSQL's oldest snapshot, which pull-sync waits behind):
    a short one claims the delivery (`sending`, the attempt counted, a lease), the POST runs,
    and another records the outcome, fenced by the attempt it claimed, so a delivery taken over
    after its lease ran out is recorded once. A 2xx answer is success; otherwise it is `failed`
    with the next attempt due after a jittered exponential backoff, or `dead` after
    WEBHOOK_MAX_ATTEMPTS. A delivery that is finished, deleted or held by another worker is left
    alone ("noop"), one not due yet too ("not_due", with its time), so duplicate tasks never
    add attempts. A worker lost mid-attempt leaves it `sending` until the lease ends; then the
    sweep sends it again (receivers dedupe on X-Memory-Delivery).
    """
    claimed = _delivery_claim(delivery_id=delivery_id)
    if isinstance(claimed, AttemptOutcome):
        return claimed
    status_code, reason, duration_ms = _post(claimed)
    return _delivery_record(
        delivery=claimed, status_code=status_code, reason=reason, duration_ms=duration_ms
    )


def _delivery_claim(*, delivery_id: str) -> WebhookDelivery | AttemptOutcome:
    now = timezone.now()
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("webhook")
            .filter(pk=delivery_id, status__in=[Status.PENDING, Status.FAILED, Status.SENDING])
            .first()
        )
        if delivery is None:
            return AttemptOutcome(status="noop")
        if delivery.status == Status.SENDING:
            if delivery.lease_until and delivery.lease_until > now:
                return AttemptOutcome(status="noop")  # another worker is sending it
        elif delivery.next_attempt_at and delivery.next_attempt_at > now:
            # A duplicate task, or a timer that fired early: the caller comes back when due.
            return AttemptOutcome(status="not_due", next_attempt_at=delivery.next_attempt_at)
        if delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:  # its last sender was lost
            delivery.status, delivery.next_attempt_at = Status.DEAD, None
            delivery.lease_until = None
            delivery.save(update_fields=["status", "next_attempt_at", "lease_until"])
            return AttemptOutcome(status=Status.DEAD)
        delivery.status = Status.SENDING
        delivery.attempts += 1
        delivery.lease_until = now + timedelta(seconds=settings.WEBHOOK_LEASE_SECONDS)
        delivery.save(update_fields=["status", "attempts", "lease_until"])
    return delivery


def _delivery_record(
    *, delivery: WebhookDelivery, status_code: int | None, reason: str, duration_ms: int
) -> AttemptOutcome:
    now = timezone.now()
    fields: dict[str, Any] = {
        "last_status_code": status_code,
        "last_error": reason,
        "last_duration_ms": duration_ms,
        "lease_until": None,
    }
    if status_code is not None and 200 <= status_code < 300:
        fields |= {"status": Status.SUCCESS, "delivered_at": now, "next_attempt_at": None}
    elif delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
        fields |= {"status": Status.DEAD, "next_attempt_at": None}
        logger.warning("webhook delivery %s is dead after %d attempts: %s",
                       delivery.id, delivery.attempts, reason)  # fmt: skip
    else:
        backoff = backoff_seconds(
            base=settings.WEBHOOK_BACKOFF_SECONDS, attempt=delivery.attempts - 1
        )
        fields |= {"status": Status.FAILED, "next_attempt_at": now + timedelta(seconds=backoff)}
    recorded = WebhookDelivery.objects.filter(
        pk=delivery.pk, status=Status.SENDING, attempts=delivery.attempts
    ).update(**fields)
    if not recorded:  # its lease ran out and another worker took it over
        return AttemptOutcome(status="noop")
    return AttemptOutcome(status=fields["status"], next_attempt_at=fields.get("next_attempt_at"))


def webhook_deliveries_resend(*, now: datetime | None = None) -> int:
    """Send again the deliveries whose Celery message was lost: due more than
    WEBHOOK_RESEND_GRACE_SECONDS ago and still waiting, or `sending` with their lease run out
    (the worker died). Returns how many; a duplicate task is a no-op."""
    now = now or timezone.now()
    grace = now - timedelta(seconds=settings.WEBHOOK_RESEND_GRACE_SECONDS)
    stranded = WebhookDelivery.objects.filter(
        Q(status__in=[Status.PENDING, Status.FAILED], next_attempt_at__lt=grace)
        | Q(status=Status.SENDING, lease_until__lt=now)
    ).values_list("id", flat=True)[:1000]
    ids = list(stranded)
    for delivery_id in ids:
        dispatch.webhook_delivery_send(delivery_id=str(delivery_id))
    return len(ids)


def _post(delivery: WebhookDelivery) -> tuple[int | None, str, int]:
    """POST the delivery to its checked address; (status code, our reason, milliseconds). The
    response's body is never read: nothing of the receiver's, an internal page perhaps, is
    stored or shown."""
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    try:
        target = targets.target_resolve(delivery.webhook.url)
    except targets.TargetRefused as exc:
        return None, f"Refused, nothing sent: {exc.reason}", 0
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "X-Memory-Event": delivery.payload.get("event_type", ""),
        "X-Memory-Delivery": str(delivery.id),
        "X-Memory-Timestamp": timestamp,
        "X-Memory-Signature": sign(secret=delivery.webhook.secret, timestamp=timestamp, body=body),
    }
    timeout = httpx.Timeout(
        settings.WEBHOOK_TIMEOUT_SECONDS, connect=settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS
    )
    # The certificate is checked against the host the URL names, not the address dialled.
    extensions = {"sni_hostname": target.host} if target.url.startswith("https:") else {}
    started = time.monotonic()
    try:
        # No redirects (a 3xx is a failure), no proxies from the environment.
        with (
            httpx.Client(
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                transport=DeadlineTransport(seconds=settings.WEBHOOK_TOTAL_TIMEOUT_SECONDS),
            ) as client,
            client.stream(
                "POST", target.url, content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            status_code = response.status_code
    except httpx.TimeoutException:
        return None, "Timed out.", _elapsed_ms(started)
    except httpx.HTTPError as exc:
        return None, f"Could not deliver ({type(exc).__name__}).", _elapsed_ms(started)
    if 200 <= status_code < 300:
        return status_code, "", _elapsed_ms(started)
    if 300 <= status_code < 400:
        return status_code, f"HTTP {status_code}: redirects are not followed.", _elapsed_ms(started)
    return status_code, f"HTTP {status_code}.", _elapsed_ms(started)


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
