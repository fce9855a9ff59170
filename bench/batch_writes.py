"""Memory writes per second through `POST /v1/memories/batch` (synchronous, 1000 creates a call),
next to two baselines measured in the same run: the in-process service without HTTP
(`memories.batch.memories_batch_apply`) and a raw binary COPY of as many rows into a scratch table
with a B-tree on the user (the design doc measured 67,000 rows/s). Prints one JSON object.

    .venv/bin/python bench/batch_writes.py [--clients 2,3,4] [--duration 20] [--profile]
    .venv/bin/python bench/batch_writes.py --as-shipped

Every item is a distinct text like a real memory ("Adopted a beagle named Toby from a shelter in
Ballard"), over a vocabulary of tens of thousands of words (`memory_text.py`): an embedder's
per-word cache cannot make the figure.

Tuned (the default): uvicorn --workers 2 alone, rate limiting off, logs at WARNING.
`--as-shipped`: the service as `make run` starts it (`python -m memoryproject.run`: one uvicorn
process, a Celery worker per lane, beat, the event consumers; rate limits and logs at their
defaults), so the batch worker publishing the bulk events runs during the measurement too.

Target (issue): >= 10,000 writes/s on this 2-core machine, as shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import common
from memory_text import MemoryText, vocabulary

TARGET_WRITES_PER_S = 10_000
DESIGN_DOC_COPY_ROWS_PER_S = 67_000
MAX_CALLS_PER_CLIENT = 5_000  # a bound on every loop, whatever the clock says
MAX_COPY_ROWS = 400_000


@dataclass
class Call:
    started: float
    ended: float
    ok: int
    failed: int
    status: int


def make_items(source: MemoryText, user_ids: list[str], count: int) -> list[dict[str, Any]]:
    """`count` create items, each a text `source` never gave before, spread round-robin over the
    users."""
    return [
        {"user_id": user_ids[i % len(user_ids)], "content": text, "type": "fact"}
        for i, text in enumerate(source.texts(count))
    ]


# --- HTTP ----------------------------------------------------------------------------------------


def client_loop(
    *,
    name: str,
    web: common.WebServer,
    tenancy: common.Tenancy,
    items_per_call: int,
    stop_at: float,
    calls: list[Call],
) -> None:
    headers = {**tenancy.headers, "Content-Type": "application/json"}
    source = MemoryText(name)
    errors_in_a_row = 0
    with common.http_client(web.base_url, headers, timeout=120) as client:
        for _ in range(MAX_CALLS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                return
            body = json.dumps({"items": make_items(source, tenancy.user_ids, items_per_call)})
            started = time.monotonic()
            try:
                response = client.post("/v1/memories/batch", content=body)
            except Exception as exc:  # a dead server must not spin this loop
                common.log(f"{name}: {exc!r}")
                errors_in_a_row += 1
                if errors_in_a_row >= 10:
                    return
                time.sleep(0.2)
                continue
            ended = time.monotonic()
            errors_in_a_row = 0
            ok = failed = 0
            if response.status_code == 200:
                answer = response.json()
                ok, failed = answer["ok"], answer["failed"]
            calls.append(Call(started, ended, ok, failed, response.status_code))
            if response.status_code == 429:  # the tenant's rate limit, as shipped: as told
                time.sleep(min(float(response.headers.get("Retry-After") or 1), 5))


def run_http(
    *,
    web: common.WebServer,
    tenancy: common.Tenancy,
    clients: int,
    items_per_call: int,
    warmup: float,
    duration: float,
    pids: dict[str, int],
    drain: bool = False,
) -> dict[str, Any]:
    """K client threads for warm-up + duration; calls completing inside the measured window
    count, so the boundary calls on both sides roughly cancel."""
    calls: list[Call] = []
    begin = time.monotonic()
    window_start, window_end = begin + warmup, begin + warmup + duration
    run_id = uuid.uuid4().hex[:6]
    threads = [
        threading.Thread(
            target=client_loop,
            kwargs=dict(
                name=f"{run_id}-k{clients}-c{i}",
                web=web,
                tenancy=tenancy,
                items_per_call=items_per_call,
                stop_at=window_end,
                calls=calls,
            ),
            daemon=True,
        )
        for i in range(clients)
    ]
    cpu_at_start = common.cpu_snapshot(pids)
    for thread in threads:
        thread.start()
    time.sleep(max(window_start - time.monotonic(), 0))
    cpu_before = common.cpu_snapshot(pids)
    time.sleep(max(window_end - time.monotonic(), 0))
    cpu = common.cpu_delta(cpu_before, common.cpu_snapshot(pids))
    for thread in threads:
        thread.join(timeout=120)
    drain_seconds = wait_for_fan_out() if drain else None
    cpu_drained = common.cpu_delta(cpu_at_start, common.cpu_snapshot(pids))
    measured = [c for c in calls if window_start <= c.ended <= window_end]
    ok = sum(c.ok for c in measured)
    written = sum(c.ok for c in calls)
    return {
        "clients": clients,
        "writes_per_s": round(ok / duration),
        "calls": len(measured),
        "items_ok": ok,
        "items_failed": sum(c.failed for c in measured),
        "non_200_calls": sum(c.status != 200 for c in calls),
        "calls_429": sum(c.status == 429 for c in calls),
        "call_latency": common.latency_summary([c.ended - c.started for c in measured]),
        "cpu_cores_used": {name: round(seconds / duration, 2) for name, seconds in cpu.items()},
        "cpu_ms_per_1000_writes": {
            name: round(seconds * 1000 / ok * 1000, 1) for name, seconds in cpu.items() if ok
        },
        "total_rows_written": written,
        # Every write of the run (warm-up and boundary calls too) and all its fan-out: the CPU
        # from the first call until the outbox is published and every consumer group has read
        # and acknowledged the stream. Unlike the window's figure, a fan-out that falls behind
        # (left for after the window) is counted too.
        "fan_out_drain_s": drain_seconds,
        "cpu_ms_per_1000_writes_drained": {
            name: round(seconds * 1000 / written * 1000, 1)
            for name, seconds in cpu_drained.items()
            if written and name != "client"
        }
        if drain
        else None,
    }


def wait_for_fan_out(max_seconds: float = 180) -> float | None:
    """Seconds until the outbox has no unpublished row, the batch lane is empty and every
    consumer group has acknowledged all of the stream (None: not within `max_seconds`)."""
    from memories import queue_load
    from memories.events.stream import STREAM_KEY, redis_client
    from memories.models import OutboxEvent

    client = redis_client()
    started = time.monotonic()
    while time.monotonic() - started < max_seconds:
        last = client.xinfo_stream(STREAM_KEY)["last-generated-id"]
        groups = client.xinfo_groups(STREAM_KEY)
        if (
            not OutboxEvent.objects.filter(published_at__isnull=True).exists()
            and queue_load.lane_depths()["batch"] == 0
            and all(g["pending"] == 0 and g["last-delivered-id"] == last for g in groups)
        ):
            return round(time.monotonic() - started, 1)
        time.sleep(0.2)
    return None


# --- Baselines -----------------------------------------------------------------------------------


def run_service(
    *, tenancy: common.Tenancy, items_per_call: int, max_rows: int, max_seconds: float
) -> dict[str, Any]:
    """The service alone, in this process, one call at a time (one core at most); building the
    items is left out of the timing, as parsing JSON is left out on the server's side."""
    from memories.batch import memories_batch_apply
    from memories.providers.wiring import get_embedder

    embedder = get_embedder()
    source = MemoryText(f"service-{uuid.uuid4().hex}")
    durations: list[float] = []
    ok = 0
    stop_at = time.monotonic() + max_seconds
    for _ in range(max(max_rows // items_per_call, 1)):
        if time.monotonic() >= stop_at:
            break
        items = make_items(source, tenancy.user_ids, items_per_call)
        started = time.perf_counter()
        results = memories_batch_apply(tenant=tenancy.tenant, raw_items=items, embedder=embedder)
        durations.append(time.perf_counter() - started)
        ok += sum(r["status"] == "ok" for r in results)
    return {
        "writes_per_s": round(ok / sum(durations)) if durations else 0,
        "calls": len(durations),
        "items_ok": ok,
        "call_latency": common.latency_summary(durations),
    }


def profile_service(tenancy: common.Tenancy, items_per_call: int, calls: int = 10) -> None:
    """cProfile of the service path, top functions to stderr (for --profile)."""
    import cProfile
    import io
    import pstats

    from memories.batch import memories_batch_apply
    from memories.providers.wiring import get_embedder

    embedder = get_embedder()
    source = MemoryText(f"profile-{uuid.uuid4().hex}")
    batches = [make_items(source, tenancy.user_ids, items_per_call) for _ in range(calls)]
    profiler = cProfile.Profile()
    profiler.enable()
    for items in batches:
        memories_batch_apply(tenant=tenancy.tenant, raw_items=items, embedder=embedder)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    common.log(f"service profile ({calls} calls of {items_per_call} items), by tottime:\n")
    print(out.getvalue(), file=sys.stderr)


def run_copy(bench: common.BenchEnv, *, rows: int, user_ids: list[str], chunk: int) -> dict:
    """Raw binary COPY of (id, user, content, embedding vector(384)) into a scratch table with a
    B-tree on the user: once in `chunk`-row transactions (the batch API's shape), once as a
    single COPY. Rows are built before the clock starts; vectors come from a pool of 1000."""
    from pgvector import Vector
    from pgvector.psycopg import register_vector

    from memories.providers.wiring import get_embedder

    contents = MemoryText(f"copy-{uuid.uuid4().hex}").texts(rows)
    pool = [Vector(v) for v in get_embedder().embed(contents[:1000])]
    users = [uuid.UUID(u) for u in user_ids]
    table = [
        (uuid.uuid4(), users[i % len(users)], contents[i], pool[i % len(pool)]) for i in range(rows)
    ]
    statement = "COPY bench_copy (id, user_id, content, embedding) FROM STDIN WITH (FORMAT BINARY)"
    with common.raw_connection(bench) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS bench_copy")
        conn.execute(
            "CREATE TABLE bench_copy (id uuid, user_id uuid, content text, embedding vector(384))"
        )
        conn.execute("CREATE INDEX bench_copy_user ON bench_copy (user_id)")
        timings = {}
        for label, size in (("chunked", chunk), ("single", rows)):
            conn.execute("TRUNCATE bench_copy")
            started = time.perf_counter()
            for start in range(0, rows, size):
                with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
                    copy.set_types(["uuid", "uuid", "text", "vector"])
                    for row in table[start : start + size]:
                        copy.write_row(row)
            timings[label] = time.perf_counter() - started
        conn.execute("DROP TABLE bench_copy")
    return {
        "rows": rows,
        "rows_per_s_1000_per_transaction": round(rows / timings["chunked"]),
        "rows_per_s_single_copy": round(rows / timings["single"]),
        "design_doc_rows_per_s": DESIGN_DOC_COPY_ROWS_PER_S,
    }


# --- The service as `make run` starts it ---------------------------------------------------------

# What `common.prepare` sets for every bench and `make run` leaves at its defaults.
BENCH_ONLY_SETTINGS = ("LOG_LEVEL", "LOG_FORMAT", "RATE_LIMIT_PER_SECOND")


def start_as_shipped(bench: common.BenchEnv) -> tuple[common.WebServer, dict[str, int]]:
    """`python -m memoryproject.run` on the bench's database and Redis db, with the settings
    `make run` has (the offline providers stay forced: no network). Its metrics folder and beat's
    schedule go to a scratch folder, not the dev var/. Returns the web server and the pid of each
    process it started, by role."""
    import httpx
    import psutil

    port = common.free_port()
    scratch = common._logs() / "run-var"
    env = {key: value for key, value in bench.env.items() if key not in BENCH_ONLY_SETTINGS}
    env.update(HOST="127.0.0.1", PORT=str(port), MEMORY_VAR_DIR=str(scratch))
    process = common.spawn("make-run", [sys.executable, "-m", "memoryproject.run"], env)
    url = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"make run did not come up:\n{process.log_tail()}")
        time.sleep(0.2)
    roles = {
        "web": "uvicorn",
        "worker_high": "high@",
        "worker_default": "default@",
        "worker_batch": "batch@",
        "beat": " beat ",
        "consumers": "consume_events",
    }
    pids: dict[str, int] = {}
    for child in psutil.Process(process.pid).children():
        command = " ".join(child.cmdline())
        for role, marker in roles.items():
            if marker in f"{command} ":
                pids[role] = child.pid
    time.sleep(5)  # the workers and consumers finish starting before the clock does
    common.log(f"make run up on port {port}: {', '.join(sorted(pids))}")
    return common.WebServer(process, port), pids


# --- Main ----------------------------------------------------------------------------------------


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="2,3,4", help="client thread counts to run, in turn")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--items", type=int, default=1000, help="items per call")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument(
        "--as-shipped", action="store_true", help="the service as `make run` starts it"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="HTTP only: no in-process or COPY baseline"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the service to stderr")
    parser.add_argument("--max-seconds", type=float, default=420, help="total runtime cap")
    args = parser.parse_args()
    common.install_runtime_cap(args.max_seconds)
    started = time.monotonic()
    load_at_start = common.machine()
    try:
        bench = common.prepare()
        tenancy = common.create_tenancy("bench-batch", args.users)
        if args.as_shipped:
            web, started_pids = start_as_shipped(bench)
        else:
            web = common.start_web(bench, workers=args.web_workers)
            started_pids = {"web": web.process.pid}
        pids = {**started_pids, **common.server_pids(bench), "client": os.getpid()}
        runs = []
        for clients in [int(k) for k in args.clients.split(",") if k]:
            common.log(f"HTTP: {clients} clients, {args.warmup}s warm-up + {args.duration}s")
            runs.append(
                run_http(
                    web=web,
                    tenancy=tenancy,
                    clients=clients,
                    items_per_call=args.items,
                    warmup=args.warmup,
                    duration=args.duration,
                    pids=pids,
                    drain=args.as_shipped,
                )
            )
            common.log(f"  {runs[-1]['writes_per_s']} writes/s")
        web.process.stop()  # the baselines get the machine to themselves
        best = max(runs, key=lambda run: run["writes_per_s"])
        rows = min(max(best["items_ok"], args.items), MAX_COPY_ROWS)
        service: dict[str, Any] = {"writes_per_s": 0, "items_ok": 0}
        copy: dict[str, Any] = {}
        if not args.no_baselines:
            common.log(f"service in-process baseline, up to {rows} rows")
            service = run_service(
                tenancy=tenancy,
                items_per_call=args.items,
                max_rows=rows,
                max_seconds=args.duration,
            )
        if args.profile:
            profile_service(tenancy, args.items)
        if not args.no_baselines:
            common.log(f"COPY baseline, {rows} rows")
            copy = run_copy(bench, rows=rows, user_ids=tenancy.user_ids, chunk=args.items)
        checks = _row_checks(bench, tenancy, runs, service)
    finally:
        common.stop_all()
    copy_rate = copy.get("rows_per_s_1000_per_transaction")
    service_rate = service["writes_per_s"]
    return {
        "benchmark": "batch_writes",
        "machine": load_at_start,
        "config": {
            "web": "as `make run` starts it (python -m memoryproject.run)"
            if args.as_shipped
            else f"uvicorn --workers {args.web_workers} alone",
            "as_shipped": args.as_shipped,
            "processes_measured": sorted(started_pids),
            "items_per_call": args.items,
            "users": args.users,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "mode": "sync, create items only, every text distinct (bench/memory_text.py)",
        },
        "http": runs,
        "best_http_writes_per_s": best["writes_per_s"],
        "service_in_process_single_thread": service if service_rate else None,
        "copy_baseline": copy or None,
        "ratios": {
            "http_over_copy": round(best["writes_per_s"] / copy_rate, 3) if copy_rate else None,
            "service_over_copy": round(service_rate / copy_rate, 3) if copy_rate else None,
            "http_over_service": round(best["writes_per_s"] / service_rate, 3)
            if service_rate
            else None,
        },
        "target_writes_per_s": TARGET_WRITES_PER_S,
        "meets_target": best["writes_per_s"] >= TARGET_WRITES_PER_S,
        "checks": checks,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def _row_checks(
    bench: common.BenchEnv,
    tenancy: common.Tenancy,
    runs: list[dict[str, Any]],
    service: dict[str, Any],
) -> dict[str, Any]:
    """Rows in the table vs rows reported written; that every text written is distinct, and how
    many words they use; and the bulk events left for the batch lane (only `--as-shipped` runs a
    batch worker, so only there is their publishing on the measured path)."""
    from memories import queue_load
    from memories.models import Memory, OutboxEvent

    reported = sum(run["total_rows_written"] for run in runs) + service["items_ok"]
    in_table = Memory.objects.filter(tenant=tenancy.tenant).count()
    with common.raw_connection(bench) as conn:
        distinct = conn.execute("SELECT count(DISTINCT content) FROM memories_memory").fetchone()
        sample = conn.execute(
            "SELECT content FROM memories_memory ORDER BY random() LIMIT 100000"
        ).fetchall()
    return {
        "rows_reported_ok": reported,
        "rows_in_table_incl_profile": in_table,
        "distinct_contents_in_table": distinct[0] if distinct else None,
        "distinct_words_in_100k_rows": len(vocabulary(row[0] for row in sample)),
        "unpublished_outbox_events": OutboxEvent.objects.filter(published_at__isnull=True).count(),
        "batch_lane_depth": queue_load.lane_depths()["batch"],
    }


if __name__ == "__main__":
    common.run_main("batch_writes", main)
