"""Tenants, their API keys (created, revoked) and their end users, created (a user is erased by
memories.erasure)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from memories.access import ADMIN, ROLES, grants_validate
from memories.auth import hash_api_key
from memories.errors import AlreadyExists, InvalidInput
from memories.models import ApiKey, EndUser, Tenant


def tenant_get_or_create(*, name: str) -> Tenant:
    tenant, _ = Tenant.objects.get_or_create(name=name)
    return tenant


def api_key_create(
    *,
    tenant: Tenant,
    name: str = "",
    expires_at: datetime | None = None,
    role: str = ADMIN,
    grants: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; return it with its raw value, which is never stored nor shown again.
    `grants` are checked (InvalidInput naming `grants`) and stored in canonical form."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}.", field="role")
    raw_key = f"mem_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=raw_key[:12],
        key_hash=hash_api_key(raw_key),
        expires_at=expires_at,
        role=role,
        grants=grants_validate(grants or []),
    )
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke the key from now on (a revoked key stays listed). Saved through the model, so the
    authentication cache of this process forgets it at once (memories.auth)."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def end_user_create(
    *,
    tenant: Tenant,
    external_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    created_by_key_id: Any = None,
) -> EndUser:
    """A new user; `created_by_key_id`, the key creating it, may use it without a grant."""
    try:
        with transaction.atomic():
            return EndUser.objects.create(
                tenant=tenant,
                external_id=external_id,
                metadata=metadata or {},
                created_by_key_id=created_by_key_id,
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
