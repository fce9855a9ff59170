"""The Celery app, configured from Django settings (CELERY_ namespace)."""

import os

from celery import Celery
from celery.signals import task_postrun
from django.db import close_old_connections

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
    "tasks.erasure",
]


@task_postrun.connect(weak=False, dispatch_uid="return_database_connection")
def _return_database_connection(**kwargs: object) -> None:
    """After each task, give the connection back to the pool (and drop it if it broke), which the
    fixup no longer does for us once CELERY_DB_REUSE_MAX is set (see settings)."""
    close_old_connections()
