"""Key roles and grants (memories.access). Every existing key becomes an `admin` with no grants
(the column default fills the rows), so keys made before roles keep doing what they did. Users get
the key that created them (unknown, null, for those made before); history entries the key behind
a change (null before). The audit log gains the index GET /v1/audit pages on."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("memories", "0018_idempotent_writes_sync_purge"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="grants",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AddField(
            model_name="apikey",
            name="role",
            field=models.CharField(
                choices=[("admin", "Admin"), ("agent", "Agent"), ("read-only", "Read Only")],
                default="admin",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="enduser",
            name="created_by_key",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="memories.apikey",
            ),
        ),
        migrations.AddField(
            model_name="memoryhistory",
            name="actor_key_id",
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="auditlogentry",
            index=models.Index(fields=["tenant_id", "-id"], name="audit_by_tenant_id"),
        ),
    ]
