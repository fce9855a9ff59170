"""Retry delays: exponential, jittered, so work that failed together does not retry together."""

from __future__ import annotations

from memories.backoff import backoff_seconds


def test_retries_of_the_same_attempt_spread_over_the_upper_half_of_the_backoff() -> None:
    delays = [backoff_seconds(base=2.0, attempt=3) for _ in range(200)]
    assert all(8.0 <= delay <= 16.0 for delay in delays)  # half to all of 2 * 2**3
    assert max(delays) - min(delays) > 4.0  # spread, not one instant for every job


def test_each_attempt_waits_longer_than_the_one_before() -> None:
    # The lowest delay of attempt n+1 is the highest of attempt n: retries never come sooner.
    for attempt in range(6):
        assert backoff_seconds(base=1.0, attempt=attempt + 1) >= 2**attempt
