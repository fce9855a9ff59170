from __future__ import annotations

from django.contrib import admin
from django.db import models
from django.http import HttpRequest

from webhooks.models import Webhook, WebhookDelivery


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ["url", "tenant", "active", "event_types", "channels", "created_at"]
    list_filter = ["active", "tenant"]
    search_fields = ["url"]
    # The secret never shows (it is not editable, so no form includes it); webhooks are created
    # through the API, which hands the secret out once.
    fields = ["tenant", "url", "event_types", "channels", "active", "created_at"]
    readonly_fields = ["tenant", "created_at"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "webhook", "status", "attempts", "last_status_code", "created_at",
                    "delivered_at"]  # fmt: skip
    list_filter = ["status"]
    search_fields = ["id", "event_id", "stream_id"]
    raw_id_fields = ["webhook"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # a log
