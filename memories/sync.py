"""Pull-sync's upkeep: tombstones older than SYNC_TOMBSTONE_RETENTION_DAYS are purged, and each
tenant's purge watermark (the greatest (change_txid, id) removed, in `SyncPurge`) moves with them,
in the same transaction. A cursor before the watermark may have missed a deletion that no longer
exists: `/v1/sync` answers it `410 cursor_expired` with the snapshot to rebuild from.

The reads (changes, digest, the watermark) are in memories.selectors.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memories.models import Memory, MemoryHistory, SyncPurge

logger = logging.getLogger(__name__)


def sync_tombstones_purge(*, now: datetime | None = None, batch: int = 1000) -> int:
    """Delete tombstones (forgotten memories) older than the retention, with their history, a
    batch a transaction, raising each tenant's watermark with the rows it removes. Returns how
    many went. Safe to run again at any time: what is left is what is still younger."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.SYNC_TOMBSTONE_RETENTION_DAYS)
    purged = 0
    while True:
        with transaction.atomic():
            rows = list(
                Memory.objects.filter(deleted_at__lt=cutoff)
                .order_by("deleted_at")
                .select_for_update(skip_locked=True)
                .values_list("id", "tenant_id", "change_txid")[:batch]
            )
            if not rows:
                return purged
            marks: dict[UUID, tuple[int, UUID]] = {}
            for memory_id, tenant_id, change_txid in rows:
                mark = (change_txid or 0, memory_id)
                if tenant_id not in marks or marks[tenant_id] < mark:
                    marks[tenant_id] = mark
            ids = [memory_id for memory_id, _, _ in rows]
            MemoryHistory.objects.filter(memory_id__in=ids).delete()
            Memory.objects.filter(id__in=ids).delete()
            purged += len(ids)
            for tenant_id, (txid, memory_id) in marks.items():
                _watermark_raise(tenant_id=tenant_id, txid=txid, memory_id=memory_id)
        logger.info("sync: purged %d tombstones", len(rows))


def _watermark_raise(*, tenant_id: UUID, txid: int, memory_id: UUID) -> None:
    # Only ever forward: row comparison, as the cursors compare.
    table = SyncPurge._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} AS p (tenant_id, purged_txid, purged_memory_id, purged_at)
            VALUES (%s, %s, %s, now())
            ON CONFLICT (tenant_id) DO UPDATE
                SET purged_txid = EXCLUDED.purged_txid,
                    purged_memory_id = EXCLUDED.purged_memory_id, purged_at = now()
                WHERE (p.purged_txid, p.purged_memory_id)
                    < (EXCLUDED.purged_txid, EXCLUDED.purged_memory_id)
            """,
            [str(tenant_id), txid, str(memory_id)],
        )
