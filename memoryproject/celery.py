"""The Celery app, configured from Django settings (CELERY_ namespace)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

app = Celery("memoryproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Tasks live in the top-level `tasks` package, not inside an app: name its modules explicitly.
app.conf.imports = [
    "tasks.memory_jobs",
    "tasks.batch_jobs",
    "tasks.sweeper",
    "tasks.events",
    "tasks.webhooks",
]
