"""How hard one process may press one model endpoint: at most `limit` calls in flight, and after the
endpoint says it is rate-limited (a 429) no call at all until its Retry-After has passed, then one
probe call before the rest.

A worker runs dozens of jobs at once in threads: without this, each of them would discover a 429
on its own and retry on its own schedule, and together they would keep the endpoint saturated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class Throttle:
    """Shared by every thread of a process that calls one provider (one per provider instance)."""

    def __init__(self, *, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"a throttle's limit must be at least 1, got {limit}")
        self.limit = limit
        self._clock = clock
        self._changed = threading.Condition()
        self._in_flight = 0
        self._resume_at = 0.0
        # After a pause, one call goes first: the others wait for its answer, so a limit that is
        # still in force costs one refused call, not `limit` of them.
        self._probing = False
        self._probe_in_flight = False
        self._pauses = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the `limit` places for the duration of one HTTP call."""
        with self._changed:
            while True:
                wait = self._resume_at - self._clock()
                if wait > 0:
                    self._changed.wait(wait)
                elif self._in_flight >= self.limit or (self._probing and self._probe_in_flight):
                    self._changed.wait()
                else:
                    break
            self._in_flight += 1
            probe = self._probing
            self._probe_in_flight = self._probe_in_flight or probe
            pauses = self._pauses
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                if probe:
                    self._probe_in_flight = False
                    # The probe was answered without a new 429: the endpoint takes calls again.
                    self._probing = self._pauses != pauses
                self._changed.notify_all()

    def rate_limited(self, *, seconds: float, who: str) -> None:
        """The endpoint answered 429: no call of this process starts for `seconds`."""
        with self._changed:
            resume_at = self._clock() + seconds
            if resume_at > self._resume_at:
                logger.warning("%s is rate-limited: no call for %.2f s", who, seconds)
                self._resume_at = resume_at
            self._probing = True
            self._pauses += 1
            self._changed.notify_all()
