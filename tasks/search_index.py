"""Beat's upkeep of the approximate search index: big users' new rows moved into it."""

from __future__ import annotations

from celery import shared_task

from memories.ann_index import ann_index_refresh


@shared_task(name="tasks.search_index.refresh_ann_index", ignore_result=True)
def refresh_ann_index() -> int:
    """Mark users who reached SEARCH_ANN_MIN_MEMORIES, and move big users' rows into the HNSW
    index within SEARCH_ANN_REFRESH_BUDGET_SECONDS; the rest is the next run's."""
    return ann_index_refresh().rows_indexed
