"""Tenants, their API keys and their end users, created (a user is erased by memories.erasure)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction

from memories.auth import hash_api_key
from memories.errors import AlreadyExists
from memories.models import ApiKey, EndUser, Tenant


def tenant_get_or_create(*, name: str) -> Tenant:
    tenant, _ = Tenant.objects.get_or_create(name=name)
    return tenant


def api_key_create(
    *, tenant: Tenant, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key; return it with its raw value, which is never stored nor shown again."""
    raw_key = f"mem_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=raw_key[:12],
        key_hash=hash_api_key(raw_key),
        expires_at=expires_at,
    )
    return api_key, raw_key


def end_user_create(
    *, tenant: Tenant, external_id: str | None = None, metadata: dict[str, Any] | None = None
) -> EndUser:
    try:
        with transaction.atomic():
            return EndUser.objects.create(
                tenant=tenant, external_id=external_id, metadata=metadata or {}
            )
    except IntegrityError as exc:
        # Only the external_id can clash: name the user who holds it, so a client that lost the
        # first answer carries on with that user.
        existing = EndUser.objects.filter(tenant=tenant, external_id=external_id).first()
        raise AlreadyExists(
            f"A user with external_id {external_id!r} already exists.",
            field="external_id",
            user_id=str(existing.id) if existing else None,
        ) from exc
