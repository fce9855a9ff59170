"""Bearer API keys: `Authorization: Bearer <key>`, looked up by SHA-256, scoped to a tenant."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from django.utils import timezone
from rest_framework import authentication, exceptions

from memories.models import ApiKey, Tenant


def hash_api_key(raw_key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is as safe as a slow hash and lets the
    # lookup be one indexed equality.
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class TenantPrincipal:
    """Who is calling: a tenant, through one of its keys. DRF wants `is_authenticated`."""

    tenant: Tenant
    api_key: ApiKey
    is_authenticated: bool = True


def api_key_authenticate(header: str) -> TenantPrincipal | None:
    """The caller named by an `Authorization` header value; None when there is no header.

    Blocking (one indexed read). Raises AuthenticationFailed for another scheme, or a key that is
    unknown, revoked or expired. Shared by the DRF views and the SSE endpoint, which is served
    outside DRF.
    """
    if not header:
        return None
    scheme, _, raw_key = header.partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
    api_key = (
        ApiKey.objects.select_related("tenant")
        .filter(key_hash=hash_api_key(raw_key.strip()))
        .first()
    )
    if api_key is None or not api_key.is_usable(timezone.now()):
        raise exceptions.AuthenticationFailed("Invalid, revoked or expired API key.")
    return TenantPrincipal(tenant=api_key.tenant, api_key=api_key)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode(errors="replace")
        principal = api_key_authenticate(header)
        return None if principal is None else (principal, principal.api_key)

    def authenticate_header(self, request) -> str:
        # Having a value here makes DRF answer 401 (not 403) when the key is missing.
        return 'Bearer realm="memory"'
