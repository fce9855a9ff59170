"""HTTP for who may do what: the tenant's keys (created, listed, revoked), the calling key
(`whoami`), and the audit log of who changed what. Keys and audit want an admin key."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from memories import accounts, selectors
from memories.access import ROLES
from memories.api import TenantApi, validated_input
from memories.errors import InvalidInput
from memories.openapi import errors


class KeyOutput(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    role = serializers.CharField()
    grants = serializers.ListField(child=serializers.CharField())
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()


class KeyCollectionApi(TenantApi):
    """`POST` creates a key (its raw value is in this answer only); `GET` lists the tenant's."""

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=200, allow_blank=True, default="")
        role = serializers.ChoiceField(choices=ROLES)
        # Checked by accounts.api_key_create (a bad grant is a 400 naming `grants`).
        grants = serializers.ListField(
            child=serializers.JSONField(), required=False, default=list, max_length=1000
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)

    class CreatedOutput(KeyOutput):
        key = serializers.CharField(help_text="The raw key: shown in this answer only.")

    class ListOutput(serializers.Serializer):
        results = KeyOutput(many=True)

    @extend_schema(
        operation_id="key_create",
        request=InputSerializer,
        responses={201: CreatedOutput, **errors(403, 409)},
        tags=["keys"],
    )
    def post(self, request: Request) -> Response:
        self.access.admin()
        data = validated_input(self.InputSerializer, request.data)
        api_key, raw_key = accounts.api_key_create(
            tenant=self.tenant,
            name=data["name"],
            role=data["role"],
            grants=data["grants"],
            expires_at=data["expires_at"],
        )
        return Response({**KeyOutput(api_key).data, "key": raw_key}, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="key_list", responses={200: ListOutput, **errors(403)}, tags=["keys"]
    )
    def get(self, request: Request) -> Response:
        self.access.admin()
        keys = selectors.api_key_list(tenant=self.tenant)
        return Response({"results": KeyOutput(keys, many=True).data})


class KeyDetailApi(TenantApi):
    @extend_schema(
        operation_id="key_revoke", responses={204: None, **errors(403, 404)}, tags=["keys"]
    )
    def delete(self, request: Request, key_id: str) -> Response:
        """Revoke the key: it stops working at once here, within API_KEY_CACHE_SECONDS in other
        processes."""
        self.access.admin()
        api_key = selectors.api_key_get(tenant=self.tenant, key_id=key_id)
        accounts.api_key_revoke(api_key=api_key)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WhoamiApi(TenantApi):
    class WhoamiOutput(serializers.Serializer):
        tenant_id = serializers.UUIDField()
        key_id = serializers.UUIDField(allow_null=True)
        name = serializers.CharField(allow_blank=True)
        role = serializers.CharField()
        grants = serializers.ListField(child=serializers.CharField())

    @extend_schema(operation_id="whoami", responses={200: WhoamiOutput, **errors()}, tags=["keys"])
    def get(self, request: Request) -> Response:
        access = self.access
        return Response(
            {
                "tenant_id": str(self.tenant.id),
                "key_id": access.key_id,
                "name": access.key_name,
                "role": access.role,
                "grants": sorted(access.grants),
            }
        )


def _encode_audit_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(str(entry_id).encode()).decode()


def _decode_audit_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise ValueError(raw)
        return int(raw)
    except (ValueError, binascii.Error) as exc:
        raise InvalidInput("Malformed cursor.", field="cursor") from exc


class AuditActorOutput(serializers.Serializer):
    key_id = serializers.CharField(allow_null=True)
    agent_id = serializers.CharField(allow_null=True)


class AuditEntryOutput(serializers.Serializer):
    id = serializers.CharField()
    event_type = serializers.CharField()
    occurred_at = serializers.DateTimeField()
    memory_id = serializers.CharField(allow_null=True)
    user_id = serializers.UUIDField(allow_null=True)
    actor = AuditActorOutput()


class AuditPageOutput(serializers.Serializer):
    results = AuditEntryOutput(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class AuditApi(TenantApi):
    """`GET /v1/audit?user_id=&memory_id=&cursor=&limit=`: who changed what, newest first, from
    the audit log (written from the event stream by the `audit` consumer group)."""

    class QuerySerializer(serializers.Serializer):
        user_id = serializers.UUIDField(required=False)
        memory_id = serializers.UUIDField(required=False)
        cursor = serializers.CharField(required=False, max_length=40)
        limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=500)

    @extend_schema(
        operation_id="audit_list",
        parameters=[QuerySerializer],
        responses={200: AuditPageOutput, **errors(403)},
        tags=["keys"],
    )
    def get(self, request: Request) -> Response:
        self.access.admin()
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        before = _decode_audit_cursor(query["cursor"]) if query.get("cursor") else None
        page = selectors.audit_list(
            tenant=self.tenant,
            user_id=query.get("user_id"),
            memory_id=query.get("memory_id"),
            before=before,
            limit=query["limit"] + 1,
        )
        has_more = len(page) > query["limit"]
        page = page[: query["limit"]]
        return Response(
            {
                "results": [_audit_entry(entry) for entry in page],
                "next_cursor": _encode_audit_cursor(page[-1].id) if has_more else None,
            }
        )


def _audit_entry(entry: Any) -> dict[str, Any]:
    event = entry.payload or {}
    source = event.get("source") or {}
    memory = event.get("memory") or {}
    return {
        "id": str(entry.id),
        "event_type": entry.event_type,
        "occurred_at": entry.occurred_at.isoformat(),
        "memory_id": memory.get("id"),
        "user_id": str(entry.user_id) if entry.user_id else None,
        "actor": {
            "key_id": source.get("api_key_id") or None,
            "agent_id": source.get("agent_id") or None,
        },
    }
