"""Idempotent writes: an `Idempotency-Key` and the first answer it got, kept for
IDEMPOTENCY_KEY_TTL_HOURS.

    with transaction.atomic():
        stored = idempotent_write_begin(tenant_id=..., key=..., fingerprint=...)
        if stored is not None: answer stored.status / stored.body again
        ... the write ...
        idempotent_write_finish(tenant_id=..., key=..., status=..., body=..., headers=...)

The key's row is inserted first, in the write's transaction, and holds a unique (tenant, key)
index entry until that transaction ends: a duplicate sent meanwhile waits on the index, then finds
the committed answer (or, if the first rolled back, runs itself). The state of the database
decides, never a read-then-write. Memory jobs keep their own keys (memories.ledger).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from memories.errors import IdempotencyKeyReused
from memories.models import IdempotentWrite


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    body: Any
    headers: dict[str, str]


def request_fingerprint(*, method: str, path: str, body: Any) -> str:
    """sha256 of the request: its method, its path and its body as canonical JSON (so the same
    body sent with other spacing or key order is the same request)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method}\n{path}\n{canonical}".encode()).hexdigest()


def idempotent_write_begin(
    *, tenant_id: UUID | str, key: str, fingerprint: str
) -> StoredAnswer | None:
    """Take the key for this write (inside its transaction): None when the write is to run now;
    the first answer when the same request already ran. IdempotencyKeyReused (422) when the key
    was used for another request. A key whose answer expired is taken afresh."""
    now = timezone.now()
    expires_at = now + timedelta(hours=settings.IDEMPOTENCY_KEY_TTL_HOURS)
    table = IdempotentWrite._meta.db_table
    for _ in range(3):  # a stored answer deleted between our two statements: take the key again
        with connection.cursor() as cursor:
            # Blocks while another transaction holds the same key, until it ends.
            cursor.execute(
                f"""
                INSERT INTO {table} AS w
                    (tenant_id, key, fingerprint, status, body, headers, created_at, expires_at)
                VALUES (%s, %s, %s, NULL, NULL, '{{}}', %s, %s)
                ON CONFLICT (tenant_id, key) DO UPDATE
                    SET fingerprint = EXCLUDED.fingerprint, status = NULL, body = NULL,
                        headers = '{{}}', created_at = EXCLUDED.created_at,
                        expires_at = EXCLUDED.expires_at
                    WHERE w.expires_at <= EXCLUDED.created_at
                RETURNING id
                """,
                [str(tenant_id), key, fingerprint, now, expires_at],
            )
            if cursor.fetchone() is not None:
                return None
        stored = (
            IdempotentWrite.objects.filter(tenant_id=tenant_id, key=key)
            .values_list("fingerprint", "status", "body", "headers")
            .first()
        )
        if stored is None:
            continue
        stored_fingerprint, status, body, headers = stored
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used with another request; use a new key."
            )
        assert status is not None  # only its own transaction sees a row without an answer
        return StoredAnswer(status=status, body=body, headers=headers or {})
    raise IdempotencyKeyReused("This Idempotency-Key is in use; try again.")


def idempotent_write_finish(
    *, tenant_id: UUID | str, key: str, status: int, body: Any, headers: dict[str, str]
) -> None:
    """Save the write's answer with the key (in the write's transaction, before it commits)."""
    IdempotentWrite.objects.filter(tenant_id=tenant_id, key=key).update(
        status=status, body=body, headers=headers
    )


def idempotent_writes_expire(*, batch: int = 10_000) -> int:
    """Delete stored answers past their time, a batch a statement; returns how many went."""
    deleted = 0
    while True:
        ids = list(
            IdempotentWrite.objects.filter(expires_at__lte=timezone.now())
            .order_by("expires_at")
            .values_list("id", flat=True)[:batch]
        )
        if not ids:
            return deleted
        deleted += IdempotentWrite.objects.filter(id__in=ids).delete()[0]
