"""Background threads that live as long as their process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class ProcessThread:
    """A daemon thread running `target`, started on first use in each process.

    A forked child (Celery's prefork pool) inherits the object but not the thread, so the first
    use in the child starts a thread of its own.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
                self._thread.start()
