"""Dates and validity: a memory's `occurred_at` (filled from `created_at` for existing rows) in
its keyword index, `valid_to` for closed memories, and each history entry's `occurred_at` and
`reason`.

A generated column cannot be altered in place: the search vector is dropped and added again with
its new expression (PostgreSQL computes it for every row), and its GIN index with it.
"""

import django.contrib.postgres.indexes
import django.contrib.postgres.search
import django.utils.timezone
from django.db import migrations, models

import memories.models


class Migration(migrations.Migration):
    dependencies = [
        ("memories", "0013_job_order"),
    ]

    operations = [
        migrations.AddField(
            model_name="memory",
            name="occurred_at",
            field=models.DateTimeField(null=True),
        ),
        migrations.AddField(
            model_name="memoryhistory",
            name="occurred_at",
            field=models.DateTimeField(null=True),
        ),
        migrations.RunSQL(
            [
                "UPDATE memories_memory SET occurred_at = created_at",
                "UPDATE memories_memoryhistory SET occurred_at = created_at",
            ],
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="memory",
            name="occurred_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
        migrations.AlterField(
            model_name="memoryhistory",
            name="occurred_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
        migrations.AddField(
            model_name="memory",
            name="valid_to",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="memoryhistory",
            name="reason",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="memoryhistory",
            name="event",
            field=models.CharField(
                choices=[
                    ("ADD", "Add"),
                    ("UPDATE", "Update"),
                    ("DELETE", "Delete"),
                    ("CLOSE", "Close"),
                ],
                max_length=8,
            ),
        ),
        migrations.RemoveIndex(model_name="memory", name="memory_search_vector_gin"),
        migrations.RemoveField(model_name="memory", name="search_vector"),
        migrations.AddField(
            model_name="memory",
            name="search_vector",
            field=models.GeneratedField(
                db_persist=True,
                expression=django.contrib.postgres.search.CombinedSearchVector(
                    django.contrib.postgres.search.SearchVector("content", config="english"),
                    "||",
                    django.contrib.postgres.search.SearchVector(
                        memories.models.DateWords("occurred_at"), config="english"
                    ),
                    django.contrib.postgres.search.SearchConfig("english"),
                ),
                output_field=django.contrib.postgres.search.SearchVectorField(),
            ),
        ),
        migrations.AddIndex(
            model_name="memory",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["search_vector"], name="memory_search_vector_gin"
            ),
        ),
    ]
