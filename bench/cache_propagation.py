"""Cache propagation: from one agent's direct write to other agents' `memoryclient.LocalCache`
holding it, with 10 and 100 caches, against the service as shipped. Prints one JSON object.

    .venv/bin/python bench/cache_propagation.py                          # 10 and 100 caches
    .venv/bin/python bench/cache_propagation.py --caches 10 --writes 50  # a smoke run
    .venv/bin/python bench/cache_propagation.py --shared tenant          # tenant scope instead

The stack is `python -m memoryproject.run` itself (what `make run` starts: uvicorn, one Celery
worker per lane, beat, the event consumers; logs, rate limit and every runner setting at their
defaults) on a free loopback port, with a scratch var folder, against the bench database
`memory_bench` and Redis db 15.

Each round (one per `--caches` count) gets a fresh tenant, so its topic starts empty. The caches
are agents: each its own `MemoryClient` (its own connections) and its own end user, all in this
process (a thread each, as the SDK runs them), `LocalCache(client, user_id, include_shared=False,
topics=("bench",))`. The writer is another agent: `MemoryClient.write(None, content,
scope="topic", topic="bench")`, one write at a time; the next is sent `--gap-ms` after every
cache has the previous one (or after `--timeout`), so what is measured is latency, not
throughput. A cache "has" a memory when its `on_change` callback is called with it: the SDK calls
it right after the change is in the cache, in the thread that applied it, so nothing polls.

Latency = the monotonic clock when a cache's `on_change` ran - the clock just before the writer's
`write()` call (one process, one clock). Also: the write call alone (HTTP POST to 201), and per
write the first and the last cache to have it (the last one is when "every agent knows").

`--shared tenant`: the caches use `include_shared=True` (they follow the tenant's shared channel,
found through `GET /v1/whoami`) and the writer writes `scope="tenant"`. When the server has no
`/v1/whoami` (404), the run falls back to the topic channel and says so in `config.fallback`.

The path measured: the web process commits the write and publishes it (XADD + PUBLISH to Redis)
after commit, its SSE hub hears it and writes it to every subscribed connection; each cache's
thread parses the event and applies it. All caches share this process's GIL, so at 100 caches
the last cache's figure includes waiting for the other 99 threads (`cpu_cores_used.bench_client`
shows how busy this process was).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import common  # first: it puts the project on sys.path

from memoryclient import LocalCache, MemoryClient, NotFound

TOPIC = "bench"
WARMUP_WRITES = 10
CACHE_START_THREADS = 10  # caches warmed up and subscribed this many at a time


# --- The stack as shipped -----------------------------------------------------------------------


def _roles(runner_pid: int) -> dict[str, int]:
    """The runner's children by what they are (as memoryproject/run.py names them)."""
    import psutil

    roles: dict[str, int] = {}
    for child in psutil.Process(runner_pid).children():
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "uvicorn" in command:
            roles["web"] = child.pid
        elif "worker" in command and "-Q" in command:
            roles[f"worker_{command[command.index('-Q') + 1]}"] = child.pid
        elif "beat" in command:
            roles["beat"] = child.pid
        elif "consume_events" in command:
            roles["consumers"] = child.pid
    return roles


def start_as_shipped(bench: common.BenchEnv) -> tuple[common.ManagedProcess, int, dict[str, int]]:
    """`python -m memoryproject.run` on a free port with a scratch var folder (metrics, beat's
    schedule), so `make run`'s is never touched; returns it once /healthz answers and its web
    and consumers are up."""
    import httpx

    var_dir = tempfile.mkdtemp(prefix="memory-bench-cache-var-")
    atexit.register(shutil.rmtree, var_dir, True)
    port = common.free_port()
    env = {**bench.env, "MEMORY_VAR_DIR": var_dir, "HOST": "127.0.0.1", "PORT": str(port)}
    runner = common.spawn("memoryproject-run", [sys.executable, "-m", "memoryproject.run"], env)
    url = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 120
    while True:
        if not runner.alive():
            raise RuntimeError(f"memoryproject.run exited:\n{runner.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"memoryproject.run not ready in 120s:\n{runner.log_tail()}")
        try:
            healthy = httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            healthy = False
        roles = _roles(runner.pid) if healthy else {}
        if {"web", "consumers"} <= roles.keys():
            time.sleep(3)  # the workers and beat finish starting: their start is not measured
            return runner, port, _roles(runner.pid)
        time.sleep(0.2)


# --- Arrivals ---------------------------------------------------------------------------------


class Arrivals:
    """When each cache first held each memory id, and a wait for "every cache has it".

    A cache may hear of a memory before the writer's `write()` returns its id, so arrivals are
    kept by id whatever the writer knows yet."""

    def __init__(self, caches: int) -> None:
        self.caches = caches
        self.at: dict[str, list[float]] = {}
        self._seen: set[tuple[int, str]] = set()
        self._condition = threading.Condition()

    def listener(self, index: int) -> Callable[[str, dict[str, Any] | None], None]:
        def on_change(memory_id: str, memory: dict[str, Any] | None) -> None:
            now = time.monotonic()
            if memory is None:
                return
            with self._condition:
                if (index, memory_id) in self._seen:  # an update: only the first arrival counts
                    return
                self._seen.add((index, memory_id))
                self.at.setdefault(memory_id, []).append(now)
                if len(self.at[memory_id]) >= self.caches:
                    self._condition.notify_all()

        return on_change

    def wait_all(self, memory_id: str, timeout: float) -> list[float]:
        with self._condition:
            self._condition.wait_for(
                lambda: len(self.at.get(memory_id, ())) >= self.caches, timeout=timeout
            )
            return list(self.at.get(memory_id, ()))


# --- One round ------------------------------------------------------------------------------------


def _start_caches(caches: list[LocalCache]) -> float:
    """Warm up and subscribe every cache, CACHE_START_THREADS at a time; the seconds it took."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    with ThreadPoolExecutor(CACHE_START_THREADS) as pool:
        list(pool.map(lambda cache: cache.start(), caches))
    return time.monotonic() - started


def run_round(
    *,
    base_url: str,
    pids: dict[str, int],
    caches: int,
    writes: int,
    gap_seconds: float,
    timeout: float,
    shared: bool,
) -> dict[str, Any]:
    tenancy = common.create_tenancy(f"bench-cache-{caches}", caches)
    arrivals = Arrivals(caches)
    clients = [
        MemoryClient(base_url, tenancy.api_key, agent_id=f"reader-{n}", timeout=30)
        for n in range(caches)
    ]
    local = [
        LocalCache(
            client,
            user_id,
            include_shared=shared,
            topics=() if shared else (TOPIC,),
            ready_timeout=30,
            on_change=arrivals.listener(n),
        )
        for n, (client, user_id) in enumerate(zip(clients, tenancy.user_ids, strict=True))
    ]
    scope = {"scope": "tenant"} if shared else {"scope": "topic", "topic": TOPIC}
    writer = MemoryClient(base_url, tenancy.api_key, agent_id="writer", timeout=30)
    try:
        start_seconds = _start_caches(local)
        not_live = sum(1 for cache in local if cache.staleness != 0.0)
        tag = uuid.uuid4().hex[:6]
        for n in range(WARMUP_WRITES):  # unmeasured: connections and code paths warm up
            memory = writer.write(None, f"warm-up {tag} {n}", **scope)
            arrivals.wait_all(str(memory["id"]), timeout)
            time.sleep(gap_seconds)

        latency: list[float] = []
        first: list[float] = []
        last: list[float] = []
        write_call: list[float] = []
        after_answer: list[float] = []
        missing = 0
        cpu_before = common.cpu_snapshot(pids)
        measured_started = time.monotonic()
        for n in range(writes):
            sent = time.monotonic()
            memory = writer.write(None, f"Bench note {tag} number {n}", **scope)
            answered = time.monotonic()
            got = arrivals.wait_all(str(memory["id"]), timeout)
            write_call.append(answered - sent)
            missing += caches - len(got)
            if got:
                latency += [at - sent for at in got]
                after_answer += [at - answered for at in got]
                first.append(min(got) - sent)
                last.append(max(got) - sent)
            time.sleep(gap_seconds)
        elapsed = time.monotonic() - measured_started
        cpu = common.cpu_delta(cpu_before, common.cpu_snapshot(pids))
    finally:
        for cache in local:
            cache.stop(timeout=2)
        for client in [*clients, writer]:
            client.close()
    service = [name for name in cpu if name not in ("bench_client", "postgres", "redis")]
    cpu["service_total"] = sum(cpu[name] for name in service)
    return {
        "caches": caches,
        "writes": writes,
        "deliveries": len(latency),
        "missing_deliveries": missing,
        "caches_not_live_after_start": not_live,
        "cache_start_seconds": round(start_seconds, 2),
        "write_to_cache": common.latency_summary(latency),
        "write_to_first_cache": common.latency_summary(first),
        "write_to_last_cache": common.latency_summary(last),
        "write_call": common.latency_summary(write_call),
        "write_answered_to_cache": common.latency_summary(after_answer),
        "measured_seconds": round(elapsed, 2),
        "cpu_seconds": {name: round(s, 3) for name, s in cpu.items()},
        "cpu_cores_used": {name: round(s / max(elapsed, 1e-9), 3) for name, s in cpu.items()},
        "cpu_ms_per_write": {name: round(s * 1000 / max(writes, 1), 2) for name, s in cpu.items()},
    }


def _whoami_missing(base_url: str) -> str | None:
    """Why `include_shared=True` cannot run here, or None when it can."""
    tenancy = common.create_tenancy("bench-cache-whoami", 0)
    with MemoryClient(base_url, tenancy.api_key) as client:
        try:
            client.whoami()
        except NotFound:
            return (
                "GET /v1/whoami answered 404 (not in this build): LocalCache(include_shared=True) "
                "cannot find the tenant's channel, so this run used the topic channel instead"
            )
    return None


# --- Main ----------------------------------------------------------------------------------------


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", default="10,100", help="comma-separated cache counts")
    parser.add_argument("--writes", type=int, default=200, help="measured writes per round")
    parser.add_argument("--gap-ms", type=float, default=20, help="pause after each delivery")
    parser.add_argument("--timeout", type=float, default=5, help="seconds to wait per write")
    parser.add_argument(
        "--shared",
        choices=("tenant",),
        help="tenant: caches with include_shared=True, writes with scope tenant",
    )
    parser.add_argument("--max-seconds", type=float, default=600, help="total runtime cap")
    args = parser.parse_args()
    counts = [int(part) for part in args.caches.split(",") if part.strip()]
    common.install_runtime_cap(args.max_seconds)
    started = time.monotonic()
    machine = common.machine()
    # As shipped: the settings' own defaults for logs and the rate limiter.
    bench = common.prepare({"LOG_LEVEL": None, "LOG_FORMAT": None, "RATE_LIMIT_PER_SECOND": None})
    for name in ("httpx", "memoryclient"):  # this process's clients: quiet at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    rounds = []
    fallback = None
    try:
        runner, port, roles = start_as_shipped(bench)
        base_url = f"http://127.0.0.1:{port}"
        common.log(f"memoryproject.run up on port {port}: {', '.join(sorted(roles))}")
        pids = {**roles, **common.server_pids(bench), "bench_client": os.getpid()}
        shared = args.shared == "tenant"
        if shared and (fallback := _whoami_missing(base_url)):
            common.log(fallback)
            shared = False
        for caches in counts:
            common.log(f"{caches} caches, {args.writes} writes")
            result = run_round(
                base_url=base_url,
                pids=pids,
                caches=caches,
                writes=args.writes,
                gap_seconds=args.gap_ms / 1000,
                timeout=args.timeout,
                shared=shared,
            )
            rounds.append(result)
            summary = result["write_to_cache"]
            common.log(
                f"  p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, max "
                f"{summary['max_ms']} ms; web {result['cpu_cores_used'].get('web')} cores"
            )
        runner.stop(timeout=30)
    finally:
        common.stop_all()
    return {
        "benchmark": "cache_propagation",
        "machine": machine,
        "config": {
            "stack": "python -m memoryproject.run (web, a worker per lane, beat, consumers), "
            "as shipped",
            "cache": "LocalCache(client, user_id, "
            + ("include_shared=True)" if shared else f"include_shared=False, topics=({TOPIC!r},))"),
            "write": "MemoryClient.write(None, content, "
            + ('scope="tenant")' if shared else f'scope="topic", topic={TOPIC!r})'),
            "fallback": fallback,
            "caches_in": "this process: a MemoryClient and a thread per cache",
            "latency": "cache's on_change ran - just before write() (one monotonic clock)",
            "writes_per_round": args.writes,
            "warmup_writes": WARMUP_WRITES,
            "gap_ms": args.gap_ms,
            "timeout_s": args.timeout,
        },
        "table": [
            {
                "caches": r["caches"],
                "p50_ms": r["write_to_cache"]["p50_ms"],
                "p99_ms": r["write_to_cache"]["p99_ms"],
                "max_ms": r["write_to_cache"]["max_ms"],
                "last_cache_p50_ms": r["write_to_last_cache"]["p50_ms"],
                "last_cache_p99_ms": r["write_to_last_cache"]["p99_ms"],
                "write_call_p50_ms": r["write_call"]["p50_ms"],
                "missing": r["missing_deliveries"],
                "web_cpu_ms_per_write": r["cpu_ms_per_write"].get("web"),
                "web_cores_used": r["cpu_cores_used"].get("web"),
            }
            for r in rounds
        ],
        "rounds": rounds,
        "total_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    common.run_main("cache_propagation", main)
