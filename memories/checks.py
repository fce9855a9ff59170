"""Whether the stored vectors fit the configured embedder: a system check that refuses to start
(migrate, `make run`, `manage.py check --database default`) with an embedder whose dimension is
not the column's, and the record, after migrate, of which embedder a database's vectors are."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import DatabaseError
from django.db.models.signals import post_migrate
from django.dispatch import receiver

from memories import reembed


@register(Tags.database)
def embedding_dimensions_check(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """Run where the database is (`databases` given): migrate, `check --database default`."""
    if not databases or "default" not in databases:
        return []
    try:
        stored = reembed.stored_embeddings()
    except DatabaseError:
        return []  # an unreachable database is reported by what needs it
    spec = reembed.configured_embedder()
    if stored is None or stored.dimensions < 0:
        return []  # nothing migrated yet (the migrations create the configured dimension)
    under_way = (
        f" A re-embedding to {stored.next_embedder} is under way; run it again to finish it."
        if stored.next_embedder
        else ""
    )
    if stored.dimensions != spec.dimensions:
        message = (
            f"The stored memories have {stored.dimensions}-dimension vectors "
            f"({stored.embedder or 'embedder unrecorded'}), but the configured embedder is "
            f"{spec.label} (EMBEDDING_PROVIDER, EMBEDDING_DIMENSIONS)."
        )
        hint = (
            "Run `manage.py reembed` with this configuration to re-embed every memory (search "
            "keeps answering meanwhile), or configure the stored dimension back." + under_way
        )
        return [Error(message, hint=hint, id="memories.E001")]
    first_hashing = f"offline:{reembed.FIRST_HASHING_MODEL_NAME}:{spec.dimensions}"
    if stored.embedder == first_hashing and spec.provider == "offline":
        return []  # migration 0015 re-embeds these (the checks run before the migrations)
    if stored.embedder and stored.embedder != spec.label:
        message = (
            f"The stored memories' vectors are {stored.embedder}'s, but the configured embedder "
            f"is {spec.label}: searches compare vectors of two different models."
        )
        hint = "Run `manage.py reembed` to re-embed every memory." + under_way
        return [Warning(message, hint=hint, id="memories.W001")]
    return []


@receiver(post_migrate, dispatch_uid="memories_record_embedder")
def _record_embedder(sender: AppConfig, using: str, **kwargs: Any) -> None:
    if sender.label == "memories":
        reembed.embeddings_record(spec=reembed.configured_embedder(), using=using)
