from django.urls import path

from webhooks import api

urlpatterns = [
    path("v1/webhooks", api.WebhookCollectionApi.as_view(), name="webhooks"),
    path("v1/webhooks/<uuid:webhook_id>", api.WebhookDetailApi.as_view(), name="webhook-detail"),
    path(
        "v1/webhooks/<uuid:webhook_id>/deliveries",
        api.WebhookDeliveriesApi.as_view(),
        name="webhook-deliveries",
    ),
]
