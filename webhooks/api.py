"""HTTP for webhooks: one view per resource; validate, call a service or selector, render. Every
call wants an admin key (memories.access)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from memories.api import TenantApi, validated_input
from memories.events import EVENT_TYPES
from memories.openapi import errors
from webhooks import selectors, services, targets


class WebhookOutput(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.URLField()
    event_types = serializers.ListField(child=serializers.CharField())
    channels = serializers.ListField(child=serializers.CharField())
    active = serializers.BooleanField()
    created_at = serializers.DateTimeField()


class WebhookCollectionApi(TenantApi):
    """`POST` creates a webhook (its secret is in this answer only); `GET` lists them."""

    class InputSerializer(serializers.Serializer):
        url = serializers.URLField(max_length=2000)
        event_types = serializers.ListField(
            child=serializers.ChoiceField(choices=EVENT_TYPES),
            required=False,
            default=list,
            max_length=len(EVENT_TYPES),
        )
        channels = serializers.ListField(
            child=serializers.CharField(max_length=300), required=False, default=list,
            max_length=100,
        )  # fmt: skip

        def validate_url(self, value: str) -> str:
            # Checked again before every delivery: a name may resolve elsewhere later.
            try:
                targets.target_resolve(value)
            except targets.TargetRefused as exc:
                raise serializers.ValidationError(exc.reason) from None
            return value

    class CreatedOutput(WebhookOutput):
        secret = serializers.CharField()

    class ListOutput(serializers.Serializer):
        results = WebhookOutput(many=True)

    @extend_schema(
        operation_id="webhook_create",
        request=InputSerializer,
        responses={201: CreatedOutput, **errors(403, 409)},
        tags=["webhooks"],
    )
    def post(self, request: Request) -> Response:
        self.access.admin()
        data = validated_input(self.InputSerializer, request.data)
        webhook = services.webhook_create(
            tenant=self.tenant,
            url=data["url"],
            event_types=sorted(set(data["event_types"])),
            channels=sorted(set(data["channels"])),
        )
        return Response(self.CreatedOutput(webhook).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="webhook_list", responses={200: ListOutput, **errors(403)}, tags=["webhooks"]
    )
    def get(self, request: Request) -> Response:
        self.access.admin()
        webhooks = selectors.webhook_list(tenant=self.tenant)
        return Response({"results": WebhookOutput(webhooks, many=True).data})


class WebhookDetailApi(TenantApi):
    @extend_schema(
        operation_id="webhook_delete", responses={204: None, **errors(403, 404)}, tags=["webhooks"]
    )
    def delete(self, request: Request, webhook_id: str) -> Response:
        self.access.admin()
        webhook = selectors.webhook_get(tenant=self.tenant, webhook_id=webhook_id)
        services.webhook_delete(webhook=webhook)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DeliveryOutput(serializers.Serializer):
    id = serializers.UUIDField()
    event_id = serializers.UUIDField()
    event_type = serializers.CharField(source="payload.event_type")
    stream_id = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    last_status_code = serializers.IntegerField(allow_null=True)
    last_error = serializers.CharField()
    last_duration_ms = serializers.IntegerField(allow_null=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    delivered_at = serializers.DateTimeField(allow_null=True)


class WebhookDeliveriesApi(TenantApi):
    """The delivery log, newest first."""

    class QuerySerializer(serializers.Serializer):
        limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=500)

    OutputSerializer = DeliveryOutput

    class PageOutput(serializers.Serializer):
        webhook_id = serializers.UUIDField()
        deliveries = DeliveryOutput(many=True)

    @extend_schema(
        operation_id="webhook_deliveries",
        parameters=[QuerySerializer],
        responses={200: PageOutput, **errors(403, 404)},
        tags=["webhooks"],
    )
    def get(self, request: Request, webhook_id: str) -> Response:
        self.access.admin()
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        webhook = selectors.webhook_get(tenant=self.tenant, webhook_id=webhook_id)
        deliveries = selectors.webhook_deliveries(webhook=webhook, limit=query["limit"])
        return Response(
            {
                "webhook_id": str(webhook.id),
                "deliveries": self.OutputSerializer(deliveries, many=True).data,
            }
        )
