"""Beat's pull-sync and idempotency upkeep: tombstones past their retention, stored answers past
their time."""

from __future__ import annotations

from celery import shared_task

from memories.idempotency import idempotent_writes_expire
from memories.sync import sync_tombstones_purge


@shared_task(name="tasks.sync.purge_sync_tombstones", ignore_result=True)
def purge_sync_tombstones() -> int:
    """Purge tombstones older than SYNC_TOMBSTONE_RETENTION_DAYS and raise the tenants' sync
    watermarks with them; a rerun (or two at once) purges only what is left."""
    return sync_tombstones_purge()


@shared_task(name="tasks.sync.expire_idempotent_writes", ignore_result=True)
def expire_idempotent_writes() -> int:
    """Delete Idempotency-Key answers past IDEMPOTENCY_KEY_TTL_HOURS; a rerun deletes only what is
    left."""
    return idempotent_writes_expire()
