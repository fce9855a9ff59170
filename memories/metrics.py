"""The Prometheus metric objects, and nothing else: every module that counts imports them from
here, and `/metrics` (memories.api) renders them. Under `make run` and the compose file every
process writes to PROMETHEUS_MULTIPROC_DIR (one folder, shared by the containers in compose) and
the web process's `/metrics` sums them; without it, `/metrics` shows the web process alone."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, values

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Each process writes files named after it. Containers sharing one folder (the compose file)
    # reuse the same small pids, so the name carries the host too: "host@pid", "@" being in no
    # hostname (so one host's files are told from another's) and "_" kept out (the reader splits
    # file names on it).
    _HOST = socket.gethostname().replace("_", "-")
    values.ValueClass = values.MultiProcessValue(lambda: f"{_HOST}@{os.getpid()}")

JOBS = Counter("memory_jobs_total", "Requests processed, by lane and outcome", ["lane", "outcome"])
JOB_SECONDS = Histogram(
    "memory_job_stage_seconds",
    "Seconds per stage of a memory job or batch write (kind): queue_wait, llm, embedding, "
    "database, total; one observation per call of the stage",
    ["stage", "kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REFUSALS = Counter("backpressure_refusals_total", "Requests refused with 429", ["lane", "reason"])
BATCH_SIZE = Histogram(
    "batch_write_items", "Items per batch write", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000)
)
EVENTS_PUBLISHED = Counter("events_published_total", "Events published to the stream")
EVENTS_DROPPED = Counter(
    "events_dropped_total",
    "Stream entries a consumer group had not acknowledged, dropped at EVENT_STREAM_MAXLEN",
)
READ_EVENTS_LOST = Counter(
    "read_events_lost_total", "Events of reads (searches) not published: Redis did not answer"
)
# Every failed call to a model endpoint, also one its retry then got through: `endpoint` is `llm`
# or `embeddings`; `error` is `rate_limited` (429), `transient` (timeouts, connection errors,
# 408, 409, 5xx), `rejected` (another 4xx: a wrong key or model; the job fails at once) or
# `unusable_answer` (the LLM's answer could not be read, even when asked again).
PROVIDER_ERRORS = Counter(
    "provider_errors_total", "Failed calls to a model endpoint", ["endpoint", "error"]
)
SSE_SUBSCRIBERS = Gauge(
    "sse_subscribers", "Open Server-Sent Events connections", multiprocess_mode="livesum"
)


@contextmanager
def timed(stage: str, kind: str = "memory_job") -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        JOB_SECONDS.labels(stage=stage, kind=kind).observe(time.perf_counter() - start)
