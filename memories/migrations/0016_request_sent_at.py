"""When a request's doorbell was handed to the broker (`sent_at`), so the sweeper resends only what
is known lost. A nullable column with no default: PostgreSQL adds it to the catalog alone, with no
rewrite of the ledger's table. The unfinished requests (a probe of the partial index
`memory_request_unfinished`) take their last change as their last send: their doorbells, queued
before the deploy, are then not taken for lost and rung twice; the messages carry no send stamp,
so their lane's order tells nothing until they have drained."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("memories", "0015_offline_vectors_v2"),
    ]

    operations = [
        migrations.AddField(
            model_name="memoryrequest",
            name="sent_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunSQL(
            "UPDATE memories_memoryrequest SET sent_at = updated_at"
            " WHERE status IN ('pending', 'processing')",
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
