from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q


class Webhook(models.Model):
    """A tenant's subscription: matching events are POSTed to `url`, signed with `secret`.

    The secret is stored in clear because signing needs it; the API shows it once, at creation.
    Empty `event_types` / `channels` mean all.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("memories.Tenant", on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=2000)
    secret = models.CharField(max_length=100, editable=False)
    event_types = ArrayField(models.CharField(max_length=40), default=list, blank=True)
    channels = ArrayField(models.CharField(max_length=300), default=list, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["tenant", "created_at"], name="webhook_active_by_tenant",
                condition=Q(active=True),
            ),
        ]  # fmt: skip

    def __str__(self) -> str:
        return self.url


class WebhookDelivery(models.Model):
    """One event for one webhook, and the log of its attempts (the last one's outcome)."""

    class Status(models.TextChoices):
        PENDING = "pending"  # not attempted yet
        SENDING = "sending"  # a worker holds it (until lease_until) and is sending it
        SUCCESS = "success"
        FAILED = "failed"  # the last attempt failed; another is due at next_attempt_at
        DEAD = "dead"  # attempts exhausted

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event_id = models.UUIDField()
    stream_id = models.CharField(max_length=40)
    payload = models.JSONField()
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    # Our own short reason for the last failure; never the receiver's response body.
    last_error = models.TextField(blank=True, default="")
    last_duration_ms = models.PositiveIntegerField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        constraints = [
            # A redelivered stream entry finds its delivery instead of sending the event twice.
            models.UniqueConstraint(fields=["webhook", "event_id"], name="webhook_delivery_once"),
        ]
        indexes = [
            models.Index(fields=["webhook", "-created_at"], name="webhook_delivery_log"),
            # Beat's look for deliveries whose Celery message was lost.
            models.Index(
                fields=["next_attempt_at"], name="webhook_delivery_unfinished",
                condition=Q(status__in=["pending", "failed", "sending"]),
            ),
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"{self.payload.get('event_type')} -> {self.webhook_id} ({self.status})"
