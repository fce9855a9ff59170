"""The offline hashing embedder now computes its vectors with numpy from other features (each
distinct word hashed once, no per-word cache): vectors it stored before no longer match the
queries it embeds. Where the offline embedder is the configured one and the stored vectors are the
first hashing embedder's, they are re-embedded here (`reembed`'s shadow column and swap: resumable
if interrupted; ~10,000 memories a second). Other embedders' vectors are left alone."""

from django.db import migrations


def upgrade(apps, schema_editor):
    from memories.reembed import offline_vectors_upgrade

    offline_vectors_upgrade()


class Migration(migrations.Migration):
    # reembed manages its own transactions (batches, then a short swap under a lock).
    atomic = False

    dependencies = [
        ("memories", "0014_occurred_at_validity"),
    ]

    operations = [migrations.RunPython(upgrade, migrations.RunPython.noop)]
