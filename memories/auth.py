"""Bearer API keys: `Authorization: Bearer <key>`, looked up by SHA-256, scoped to a tenant."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone
from rest_framework import authentication, exceptions

from memories.models import ApiKey, Tenant


def hash_api_key(raw_key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is as safe as a slow hash and lets the
    # lookup be one indexed equality.
    return hashlib.sha256(raw_key.encode()).hexdigest()


# key hash -> (when it was read, the key with its tenant). Only found keys are kept, and expiry
# is still checked on every request; a revocation made in another process is seen within
# API_KEY_CACHE_SECONDS (one made here at once, see below).
_keys_read: dict[str, tuple[float, ApiKey]] = {}
_KEYS_READ_MAX = 10_000


def api_key_find(raw_key: str) -> ApiKey | None:
    """The key (its tenant loaded) behind a raw bearer value, or None. Every call of the API
    authenticates, so a key read in the last API_KEY_CACHE_SECONDS is not read again."""
    key_hash = hash_api_key(raw_key)
    now = time.monotonic()
    hit = _keys_read.get(key_hash)
    if hit is not None and now - hit[0] < settings.API_KEY_CACHE_SECONDS:
        return hit[1]
    api_key = ApiKey.objects.select_related("tenant").filter(key_hash=key_hash).first()
    if api_key is not None and settings.API_KEY_CACHE_SECONDS > 0:
        if len(_keys_read) >= _KEYS_READ_MAX:
            _keys_read.clear()
        _keys_read[key_hash] = (now, api_key)
    return api_key


@receiver(post_save, sender=ApiKey, dispatch_uid="api_key_changed")
@receiver(post_delete, sender=ApiKey, dispatch_uid="api_key_deleted")
def _forget_changed_key(sender: type, instance: ApiKey, **kwargs: Any) -> None:
    # A key revoked, given an expiry or deleted (the admin runs in a web process) stops working
    # here now; in other processes within API_KEY_CACHE_SECONDS.
    _keys_read.pop(instance.key_hash, None)


@dataclass(frozen=True)
class TenantPrincipal:
    """Who is calling: a tenant, through one of its keys. DRF wants `is_authenticated`."""

    tenant: Tenant
    api_key: ApiKey
    is_authenticated: bool = True


def api_key_authenticate(header: str) -> TenantPrincipal | None:
    """The caller named by an `Authorization` header value; None when there is no header.

    Blocking (one indexed read, unless the key was read lately). Raises AuthenticationFailed for
    another scheme, or a key that is unknown, revoked or expired. Shared by the DRF views and the
    SSE endpoint, which is served outside DRF.
    """
    if not header:
        return None
    scheme, _, raw_key = header.partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
    api_key = api_key_find(raw_key.strip())
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
