"""Structured logs: JSON lines, each carrying the `request_id` of the job it was written for."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

from memories.dispatch import REQUEST_TASKS

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


@contextmanager
def log_context(*, request_id: str) -> Iterator[None]:
    """Every log line written inside carries this request id (threads started inside do not)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    # A request's task is sent with the request id as its task id (memories.dispatch), so
    # Celery's own lines about it ("received", "succeeded", "retry"), written in the worker's main
    # process outside any log_context, name the request in the task fields of `record.data`.

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if not request_id:
            task = getattr(record, "data", None)
            if isinstance(task, dict) and task.get("name") in REQUEST_TASKS:
                request_id = str(task.get("id") or "")
        record.request_id = request_id
        return True


class JsonLogFormatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
