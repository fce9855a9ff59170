from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # Built without blocking the ledger's writes (the table holds every request ever accepted).
    atomic = False

    dependencies = [
        ("memories", "0012_keyword_search"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="memoryrequest",
            index=models.Index(
                condition=models.Q(
                    ("kind", "memory_job"), ("status__in", ["pending", "processing"])
                ),
                fields=["user", "status", "created_at", "id"],
                name="memory_request_user_turn",
            ),
        ),
    ]
