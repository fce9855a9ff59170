"""The queues, one per workload, so each gets its own worker capacity."""

from enum import StrEnum


class Queue(StrEnum):
    HIGH = "high"  # corrections and high-priority jobs: never wait behind routine work
    DEFAULT = "default"  # memory jobs
    BATCH = "batch"  # bulk writes
