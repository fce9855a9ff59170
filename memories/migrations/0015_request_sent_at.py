"""When a request's doorbell was handed to the broker (`sent_at`), so the sweeper resends only what
is known lost. A nullable column with no default: PostgreSQL adds it to the catalog alone, with
no rewrite of the ledger's table. Rows older than it read as never handed over, so the first sweep
after it rings each pending request of theirs once."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("memories", "0014_occurred_at_validity"),
    ]

    operations = [
        migrations.AddField(
            model_name="memoryrequest",
            name="sent_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
