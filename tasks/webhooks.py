"""Webhook deliveries (see the `webhooks` app). The task names a delivery row; the row holds
the state, so the task is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from memories.dispatch import DELIVER_WEBHOOK_TASK
from webhooks.services import webhook_deliveries_resend, webhook_delivery_attempt


@shared_task(
    name=DELIVER_WEBHOOK_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # attempts are bounded on the delivery row (WEBHOOK_MAX_ATTEMPTS)
)
def deliver_webhook(self, delivery_id: str) -> str:
    """POST one webhook delivery and retry it with exponential backoff until it succeeds or is
    `dead`.

    On redelivery or a duplicate message no attempt is added: a finished delivery, or one another
    worker is attempting, is a no-op, and one not due yet is retried when due. A worker killed
    mid-attempt leaves the attempt unrecorded, so the redelivered task sends again (receivers
    dedupe on X-Memory-Delivery).
    """
    outcome = webhook_delivery_attempt(delivery_id=delivery_id)
    if outcome.status in ("failed", "not_due"):
        raise self.retry(eta=outcome.next_attempt_at)
    return outcome.status


@shared_task(name="tasks.webhooks.sweep_webhook_deliveries", ignore_result=True)
def sweep_webhook_deliveries() -> int:
    """Beat's: send again the deliveries whose message was lost or whose worker died; safe to
    run any number of times (a duplicate task is a no-op)."""
    return webhook_deliveries_resend()
