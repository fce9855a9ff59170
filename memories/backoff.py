"""Retry delays: exponential in the attempt, with jitter, so that work which failed together (a
provider outage, a receiver down) does not come back together and fail again in one burst."""

from __future__ import annotations

import random


def backoff_seconds(*, base: float, attempt: int) -> float:
    """The delay before retry number `attempt` (0 for the first): between half and all of
    base * 2**attempt ("equal jitter": never less than half, so a retry is never immediate)."""
    ceiling = base * 2**attempt
    return ceiling / 2 + random.uniform(0, ceiling / 2)
