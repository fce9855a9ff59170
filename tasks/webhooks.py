"""Webhook deliveries (see the `webhooks` app)."""
