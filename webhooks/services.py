"""Writes: webhooks, their deliveries, and delivery attempts.

A delivery is a POST of the event as JSON, signed with the webhook's secret:

    X-Memory-Signature: sha256=<hex HMAC-SHA256(secret, f"{X-Memory-Timestamp}.{body}")>

Receivers should check the signature and the timestamp's age, and dedupe on X-Memory-Delivery:
delivery is at-least-once (a worker that dies after the POST and before recording it sends again).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from memories import dispatch
from memories.backoff import backoff_seconds
from memories.models import Tenant
from webhooks import selectors
from webhooks.models import Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

Status = WebhookDelivery.Status


def url_targets_private_network(url: str) -> bool:
    """Whether the URL's host is, or resolves to, a loopback, private, link-local or reserved
    address: a tenant must not make this service call into its own network (SSRF).

    Checked when a webhook is registered and again before every delivery, since a name may
    resolve elsewhere later. A name that does not resolve is not private (the POST will fail).
    """
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    for address in addresses:
        ip = ipaddress.ip_address(str(address).split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return True
    return False


def webhook_create(
    *, tenant: Tenant, url: str, event_types: list[str], channels: list[str]
) -> Webhook:
    """Create a webhook with a fresh signing secret (the caller shows it once)."""
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


def sign(*, secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


@dataclass(frozen=True)
class AttemptOutcome:
    status: str  # a WebhookDelivery.Status after the attempt, or "noop" / "not_due"
    next_attempt_at: datetime | None = None


def webhook_delivery_attempt(*, delivery_id: str) -> AttemptOutcome:
    """Make one attempt at a delivery if one is due, and log it on the delivery row.

    A 2xx answer is success. Otherwise the delivery is `failed` with the next attempt due after
    an exponential backoff with jitter (half to all of
    WEBHOOK_BACKOFF_SECONDS * 2**(attempts-1)), or `dead` once
    WEBHOOK_MAX_ATTEMPTS attempts were made. A delivery that is finished, deleted or being
    attempted by another worker is left alone ("noop"), one not due yet too ("not_due", with
    the time it is due), so duplicate tasks never add attempts.
    """
    with transaction.atomic():
        # The row lock is the attempt's lease: held during the POST (bounded by the timeout),
        # released by PostgreSQL if the worker dies, so the redelivered task can attempt again.
        delivery = (
            WebhookDelivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("webhook")
            .filter(pk=delivery_id, status__in=[Status.PENDING, Status.FAILED])
            .first()
        )
        if delivery is None:
            return AttemptOutcome(status="noop")
        if delivery.next_attempt_at and delivery.next_attempt_at > timezone.now():
            # A duplicate task, or a timer that fired early: the caller comes back when due.
            return AttemptOutcome(status="not_due", next_attempt_at=delivery.next_attempt_at)
        status_code, error = _post(delivery)
        now = timezone.now()
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error = status_code, error
        if status_code is not None and 200 <= status_code < 300:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = (
                Status.SUCCESS,
                now,
                None,
            )
        elif delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
            delivery.status, delivery.next_attempt_at = Status.DEAD, None
            logger.warning("webhook delivery %s is dead after %d attempts: %s",
                           delivery.id, delivery.attempts, error)  # fmt: skip
        else:
            backoff = backoff_seconds(
                base=settings.WEBHOOK_BACKOFF_SECONDS, attempt=delivery.attempts - 1
            )
            delivery.status, delivery.next_attempt_at = (
                Status.FAILED,
                now + timedelta(seconds=backoff),
            )
        delivery.save(update_fields=["attempts", "last_status_code", "last_error", "status",
                                     "delivered_at", "next_attempt_at"])  # fmt: skip
    return AttemptOutcome(status=delivery.status, next_attempt_at=delivery.next_attempt_at)


def _post(delivery: WebhookDelivery) -> tuple[int | None, str]:
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Memory-Event": delivery.payload.get("event_type", ""),
        "X-Memory-Delivery": str(delivery.id),
        "X-Memory-Timestamp": timestamp,
        "X-Memory-Signature": sign(secret=delivery.webhook.secret, timestamp=timestamp, body=body),
    }
    if not settings.WEBHOOK_ALLOW_PRIVATE_TARGETS and url_targets_private_network(
        delivery.webhook.url
    ):
        return None, "Refused: the URL resolves to a private or loopback address."
    try:
        response = httpx.post(
            delivery.webhook.url,
            content=body,
            headers=headers,
            timeout=settings.WEBHOOK_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:2000]
    if 200 <= response.status_code < 300:
        return response.status_code, ""
    return response.status_code, f"HTTP {response.status_code}: {response.text[:500]}"
