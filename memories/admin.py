"""The Django admin: every change an operator makes goes through the same services as the API."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from memories import accounts, erasure, ledger, memory_writes
from memories.errors import DuplicateRequest
from memories.models import ApiKey, EndUser, Memory, MemoryHistory, MemoryRequest, Tenant
from memories.providers.wiring import get_embedder


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "created_at"]
    search_fields = ["name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "tenant", "role", "created_at", "expires_at", "revoked_at"]
    list_filter = ["tenant", "role"]
    fields = [
        "tenant",
        "name",
        "role",
        "grants",
        "expires_at",
        "revoked_at",
        "prefix",
        "created_at",
    ]
    # Grants are checked where keys are made (POST /v1/keys, createapikey), not in this form.
    readonly_fields = ["grants", "prefix", "created_at"]

    def get_form(
        self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        if "role" in form.base_fields:  # left out: an admin, as with createapikey
            form.base_fields["role"].required = False
        return form

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        obj.role = obj.role or ApiKey.Role.ADMIN
        if change:
            super().save_model(request, obj, form, change)
            return
        api_key, raw_key = accounts.api_key_create(
            tenant=obj.tenant, name=obj.name, expires_at=obj.expires_at, role=obj.role
        )
        obj.pk, obj.prefix, obj.key_hash = api_key.pk, api_key.prefix, api_key.key_hash
        # The only time the key is visible: it is stored hashed.
        self.message_user(
            request,
            f"New API key (copy it now, it will not be shown again): {raw_key}",
            messages.WARNING,
        )


@admin.register(EndUser)
class EndUserAdmin(admin.ModelAdmin):
    list_display = ["id", "external_id", "tenant", "created_at"]
    list_filter = ["tenant"]
    search_fields = ["id", "external_id"]

    def get_readonly_fields(self, request: HttpRequest, obj: EndUser | None = None) -> list[str]:
        # A user's memories name its tenant too (memory_owner_fk): a user does not move. Whether
        # the user's searches use the approximate index is beat's to decide (memories.ann_index).
        return ["tenant", "ann_indexed"] if obj is not None else ["ann_indexed"]


# What PATCH may change, and what the form only shows.
_MEMORY_EDITABLE = ["content", "metadata"]
_MEMORY_SHOWN = [
    "tenant",
    "user",
    "type",
    "scope",
    "topic",
    "agent_id",
    "session_id",
    "content_hash",
    "version",
    "vector_clock",
    "created_at",
    "updated_at",
    "deleted_at",
]


@admin.register(Memory)
class MemoryAdmin(admin.ModelAdmin):
    """An operator corrects a memory as an agent does with PATCH: through
    `memory_writes.memory_update` (new version, history row, fresh embedding, event), and deletes
    it as DELETE does (a tombstone with its history and event). Memories are made by jobs and
    batches, not here, and only what PATCH may change is editable."""

    list_display = ["content", "user", "type", "version", "updated_at", "deleted_at"]
    list_filter = ["type", "scope", "tenant"]
    search_fields = ["content", "user__id", "user__external_id", "agent_id", "session_id"]
    fields = [*_MEMORY_EDITABLE, *_MEMORY_SHOWN]
    readonly_fields = _MEMORY_SHOWN

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Memory, form: Any, change: bool) -> None:
        changed = set(form.changed_data)
        if not changed & {"content", "metadata"}:
            return
        updated = memory_writes.memory_update(
            tenant_id=obj.tenant_id,
            memory_id=obj.pk,
            embedder=get_embedder(),
            content=obj.content if "content" in changed else None,
            metadata=obj.metadata if "metadata" in changed else None,
            actor=_admin_actor(request),
        )
        obj.version, obj.updated_at = updated.version, updated.updated_at

    def delete_model(self, request: HttpRequest, obj: Memory) -> None:
        erasure.memory_forget(
            tenant_id=obj.tenant_id, memory_id=obj.pk, actor=_admin_actor(request)
        )

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Memory]) -> None:
        for memory in queryset.filter(deleted_at__isnull=True):
            self.delete_model(request, memory)


def _admin_actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


@admin.register(MemoryRequest)
class MemoryRequestAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "status", "priority", "attempts", "created_at", "finished_at"]
    list_filter = ["status", "priority"]
    search_fields = ["id", "user__id", "user__external_id"]
    raw_id_fields = ["user"]
    readonly_fields = [
        "request_hash",
        "attempts",
        "lease_until",
        "result",
        "created_at",
        "updated_at",
    ]
    actions = ["retry_failed"]

    @admin.action(description="Retry the selected failed requests")
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[MemoryRequest]) -> None:
        retried = 0
        for memory_request in queryset.filter(status=MemoryRequest.Status.FAILURE):
            try:
                ledger.memory_request_retry(memory_request=memory_request)
                retried += 1
            except DuplicateRequest:
                self.message_user(
                    request, f"{memory_request.id}: an identical request is live", messages.ERROR
                )
        self.message_user(request, f"{retried} request(s) sent again.")


@admin.register(MemoryHistory)
class MemoryHistoryAdmin(admin.ModelAdmin):
    list_display = ["memory", "event", "actor", "request", "created_at"]
    list_filter = ["event"]
    search_fields = ["memory__id", "old_content", "new_content"]
    raw_id_fields = ["memory", "request"]

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # append-only
