"""The Celery app, configured from Django settings (CELERY_ namespace)."""

import os
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, task_postrun
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
    "tasks.search_index",
    "tasks.sync",
]


@task_postrun.connect(weak=False, dispatch_uid="return_database_connection")
def _return_database_connection(**kwargs: object) -> None:
    """After each task, give the connection back to the pool (and drop it if it broke), which the
    fixup no longer does for us once CELERY_DB_REUSE_MAX is set (see settings)."""
    close_old_connections()


# The header in which every message carries when it was handed to the broker (seconds since the
# epoch). The sweeper reads it on a lane's oldest queued message (memories.queue_load): a request
# rung before that was consumed already, so if it is still pending its doorbell was lost.
SENT_AT_HEADER = "sent_at"


@before_task_publish.connect(weak=False, dispatch_uid="stamp_sent_at")
def _stamp_sent_at(headers: dict[str, Any] | None = None, **kwargs: object) -> None:
    """Stamp every message as it is published: sends by name, beat's, and a task's own retry
    (which copies the first message's headers, so the stamp is set anew, never kept)."""
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()
