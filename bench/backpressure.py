"""Backpressure under a flood: a producer offers memory jobs at 5x the sustainable rate for 60 s
with the admission threshold lowered (BACKPRESSURE_MAX_DEPTH=500), so refusals happen. Counts
202s and 429s (each 429 must carry Retry-After), samples the memory of every process tree each
second, then waits (bounded) for every accepted job to succeed. Prints one JSON object.

    .venv/bin/python bench/backpressure.py [--duration 60] [--rate JOBS_PER_S] [--max-depth 500]

Promises checked (`meets_targets`): the offer is at least 5x the sustainable rate; every 202
reaches success; every refusal is a 429 with Retry-After; memory stays bounded (no process tree's
PSS grows more than MEMORY_GROWTH_BUDGET_MB between the first and last 10 s of the flood).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import common

MAX_SENDS = 100_000  # a bound on the producer, whatever the rate and duration
# "Bounded" made a number: what any one process may grow over the flood. The known growers have
# caps of their own: the offline embedder's caches (~17 MB full, per pool process) and the event
# stream (EVENT_STREAM_MAXLEN entries, ~0.5 KB each, in Redis).
MEMORY_GROWTH_BUDGET_MB = 64.0


@dataclass
class Tally:
    """What the producer saw; appended to under a lock by its threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted_ids: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    missing_retry_after: int = 0
    latency_202: list[float] = field(default_factory=list)
    latency_429: list[float] = field(default_factory=list)
    errors: int = 0
    lateness: list[float] = field(default_factory=list)  # how far behind schedule each send was


def measure_sustainable_rate(
    bench: common.BenchEnv, web: common.WebServer, tenancy: common.Tenancy, jobs: int
) -> float:
    """Jobs/s from first POST to last success for a burst of `jobs` on an idle system (it must
    stay under the admission threshold, or part of it is refused)."""
    first_post = time.time()
    ids, _, _ = common.submit_jobs(web, tenancy, f"probe{uuid.uuid4().hex[:6]}", jobs, 4)
    success, _, last = common.wait_requests_finished(bench, ids, timeout=120)
    if not success or last is None:
        raise RuntimeError("no job succeeded while measuring the sustainable rate")
    return success / (last - first_post)


def produce(
    *,
    web: common.WebServer,
    tenancy: common.Tenancy,
    rate: float,
    duration: float,
    threads: int,
    tally: Tally,
) -> float:
    """Open loop: send number i is due at start + i/rate, whatever the answers; `threads`
    senders take the next due slot. Returns the seconds it ran."""
    total = min(int(rate * duration), MAX_SENDS)
    slots = itertools.count()
    slots_lock = threading.Lock()
    tag = uuid.uuid4().hex[:6]
    start = time.monotonic()

    def sender() -> None:
        failures_in_a_row = 0
        with common.http_client(web.base_url, tenancy.headers, timeout=30) as http:
            while failures_in_a_row < 10:  # the web is gone: stop, do not spin
                with slots_lock:
                    n = next(slots)
                # Open loop, bounded in time too: a server too slow to answer keeps the
                # senders behind schedule, and what is not sent by the end is not sent.
                if n >= total or time.monotonic() >= start + duration:
                    return
                due = start + n / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent = send_one(http, tenancy, tag, n, tally, lateness=max(-delay, 0.0))
                failures_in_a_row = 0 if sent else failures_in_a_row + 1

    workers = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=duration + 60)
    return time.monotonic() - start


def send_one(
    http: Any, tenancy: common.Tenancy, tag: str, n: int, tally: Tally, lateness: float
) -> bool:
    """POST job number n and tally the answer; False when no answer came at all."""
    body = {
        "user_id": tenancy.user_ids[n % len(tenancy.user_ids)],
        "messages": common.job_messages(tag, n),
    }
    started = time.monotonic()
    try:
        response = http.post("/v1/memories", json=body)
    except Exception as exc:  # counted, and the flood goes on
        with tally.lock:
            tally.errors += 1
        common.log(f"send {n}: {exc!r}")
        return False
    elapsed = time.monotonic() - started
    with tally.lock:
        tally.statuses[response.status_code] += 1
        tally.lateness.append(lateness)
        if response.status_code == 202:
            tally.accepted_ids.append(response.json()["request_id"])
            tally.latency_202.append(elapsed)
        elif response.status_code == 429:
            tally.latency_429.append(elapsed)
            if not response.headers.get("Retry-After"):
                tally.missing_retry_after += 1
    return True


class LoadSampler:
    """Once a second: lane depth and pending requests as admission control sees them, and the
    PostgreSQL connections open to the bench database (a leak shows here first)."""

    def __init__(self, bench: common.BenchEnv) -> None:
        self.bench = bench
        self.samples: list[tuple[int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from memories import queue_load

        connections = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        pending = "SELECT count(*) FROM memories_memoryrequest WHERE status = 'pending'"
        # One connection held for the whole run (its own slot is subtracted below).
        with common.raw_connection(self.bench) as conn:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # a missed sample is not a failed bench
                    depth = queue_load.lane_depths()["default"]
                    waiting = conn.execute(pending).fetchone()[0]
                    open_connections = conn.execute(connections).fetchone()[0] - 1
                    self.samples.append((depth, waiting, open_connections))
                self._stop.wait(1.0)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        return {
            "max_default_lane_depth": max(d for d, _, _ in self.samples),
            "max_pending_requests": max(p for _, p, _ in self.samples),
            "max_postgres_connections": max(c for _, _, c in self.samples),
        }


def unfinished(bench: common.BenchEnv, request_ids: list[str]) -> dict[str, int]:
    """Status -> count of the accepted requests that did not succeed (with their attempts)."""
    query = """SELECT status || ' attempts=' || attempts, count(*) FROM memories_memoryrequest
               WHERE id = ANY(%s::uuid[]) AND status <> 'success' GROUP BY 1"""
    with common.raw_connection(bench) as conn:
        return dict(conn.execute(query, [request_ids]).fetchall())


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of flood")
    parser.add_argument(
        "--rate",
        type=float,
        default=float(os.environ.get("BENCH_SUSTAINABLE_RATE", 0)),
        help="sustainable jobs/s (default: measured first)",
    )
    parser.add_argument("--multiplier", type=float, default=5.0)
    parser.add_argument("--max-depth", type=int, default=500, help="BACKPRESSURE_MAX_DEPTH")
    parser.add_argument("--concurrency", type=int, default=2, help="default worker concurrency")
    parser.add_argument("--threads", type=int, default=16, help="producer threads")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument(
        "--no-sweeper", action="store_true", help="no beat nor high worker (no re-sends)"
    )
    parser.add_argument("--drain-timeout", type=float, default=240)
    parser.add_argument("--max-seconds", type=float, default=600, help="total runtime cap")
    args = parser.parse_args()
    common.install_runtime_cap(args.max_seconds)
    started = time.monotonic()
    load_at_start = common.machine()
    tally = Tally()
    try:
        bench = common.prepare({"BACKPRESSURE_MAX_DEPTH": args.max_depth})
        tenancy = common.create_tenancy("bench-backpressure", args.users)
        web = common.start_web(bench, workers=1)
        worker = common.start_worker(bench, lane="default", concurrency=args.concurrency)
        chores: dict[str, int] = {}
        if not args.no_sweeper:  # as `make run`: beat's sweeper re-sends jobs whose task was lost
            chores["high_worker"] = common.start_worker(bench, lane="high", concurrency=1).pid
            chores["beat"] = common.start_beat(bench).pid
        measured = not args.rate
        if measured:
            probe_jobs = min(200, args.max_depth // 2)
            common.log(f"measuring the sustainable rate with {probe_jobs} jobs")
            args.rate = measure_sustainable_rate(bench, web, tenancy, probe_jobs)
        offered = args.rate * args.multiplier
        common.log(f"sustainable {args.rate:.1f} jobs/s; flood at {offered:.1f}/s")
        pids = {
            "web": web.process.pid,
            "worker": worker.pid,
            **chores,
            **common.server_pids(bench),
        }
        with common.MemorySampler(pids) as memory, LoadSampler(bench) as load:
            flood_start = memory.elapsed()
            ran = produce(
                web=web,
                tenancy=tenancy,
                rate=offered,
                duration=args.duration,
                threads=args.threads,
                tally=tally,
            )
            flood_end = flood_start + ran
            accepted = len(tally.accepted_ids)
            common.log(f"flood over: {dict(tally.statuses)}; draining {accepted} accepted jobs")
            drain_started = time.monotonic()
            success, failure, _ = common.wait_requests_finished(
                bench, tally.accepted_ids, timeout=args.drain_timeout
            )
            drain_seconds = time.monotonic() - drain_started
        not_success = unfinished(bench, tally.accepted_ids)
    finally:
        common.stop_all()
    refused = tally.statuses.get(429, 0)
    sent = sum(tally.statuses.values())
    flood_memory = memory.summary(window=(flood_start, flood_end))
    growth = {name: tree["growth_pss_mb"] for name, tree in flood_memory.items()}
    meets = {
        "offered_at_least_5x": offered >= 4.95 * args.rate,
        "every_202_succeeded": accepted > 0 and success == accepted,
        "refusals_are_429_with_retry_after": refused > 0
        and tally.missing_retry_after == 0
        and set(tally.statuses) <= {202, 429}
        and tally.errors == 0,
        "memory_bounded": all(mb <= MEMORY_GROWTH_BUDGET_MB for mb in growth.values()),
    }
    return {
        "benchmark": "backpressure",
        "machine": load_at_start,
        "config": {
            "web": "uvicorn --workers 1",
            "worker": f"celery `default` --concurrency {args.concurrency}",
            "BACKPRESSURE_MAX_DEPTH": args.max_depth,
            "duration_s": args.duration,
            "producer_threads": args.threads,
            "sustainable_rate_source": "measured" if measured else "given",
            "sweeper": "off" if args.no_sweeper else "beat + `high` worker, as `make run`",
        },
        "sustainable_jobs_per_s": round(args.rate, 1),
        "offered_rate_per_s": round(offered, 1),
        "achieved_send_rate_per_s": round(sent / ran, 1),
        "send_lateness": common.latency_summary(tally.lateness),
        "accepted_202": accepted,
        "refused_429": refused,
        "other_statuses": {
            str(code): count for code, count in tally.statuses.items() if code not in (202, 429)
        },
        "transport_errors": tally.errors,
        "refusal_rate": round(refused / sent, 3) if sent else None,
        "accepted_per_s_during_flood": round(accepted / ran, 1),
        "retry_after_missing_on_429": tally.missing_retry_after,
        "latency_202": common.latency_summary(tally.latency_202),
        "latency_429": common.latency_summary(tally.latency_429),
        "success": success,
        "failure": failure,
        "lost": accepted - success,
        "drain_seconds": round(drain_seconds, 1),
        "load": load.summary(),
        "not_success_by_status": not_success,
        "memory_during_flood": flood_memory,
        "memory_whole_run": memory.summary(),
        "memory_growth_budget_mb_per_process": MEMORY_GROWTH_BUDGET_MB,
        "meets_targets": meets,
        "meets_target": all(meets.values()),
        "total_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    common.run_main("backpressure", main)
