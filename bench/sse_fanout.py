"""Fan-out latency of `GET /v1/stream`: from a memory change's commit to its receipt by N SSE
subscribers, all on one user channel, over loopback. Prints JSON.

    .venv/bin/python bench/sse_fanout.py [--counts 1,100,1000] [--httpx-counts 1,100] [--events 200]

Three processes, so that no timestamp waits on another part's GIL:
- server: uvicorn serving the real ASGI app (this file with --serve); it also records when the
  hub dispatches each entry, read back through /__bench__/hub;
- writer: `memory_writes.memory_update` (this file with --write); it stamps the wall clock
  just after COMMIT (an on_commit callback registered before the change, so it runs before the
  publisher's) and around the publisher's XADD + PUBLISH;
- this process: the subscribers, as asyncio protocols: raw sockets speaking HTTP/1.1 (a minimal
  chunked decoder in front of the SSE parser), and httpx for comparison. It stamps each read as
  it returns.
One change at a time: the next is written when every subscriber has the previous one.

Uses the development database (migrated by the writer) and its own Redis database (15) so the
dev stream and test runs are left alone. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

BENCH_REDIS_DB = 15
WARMUP_EVENTS = 5
RECEIPT_DEADLINE_SECONDS = 5.0
CONNECT_WAVE = 50
SERVER_LOOP, SERVER_HTTP = "auto", "auto"  # as `make run`: uvloop and httptools, installed


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


# --- Server process (--serve) ------------------------------------------------------------------


def serve(port: int, loop: str, http: str) -> None:
    """uvicorn on the project's ASGI app, plus /__bench__/hub: the hub's dispatch times."""
    import django

    django.setup()
    import uvicorn

    from memories.events import sse
    from memoryproject.asgi import application

    dispatched: dict[str, tuple[float, float]] = {}
    gc_pauses_ms: list[tuple[int, float]] = []  # (generation collected, pause)
    gc_started = [0.0]
    gc_totals: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # count, ms

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            pause = (time.perf_counter() - gc_started[0]) * 1000
            gc_totals[info["generation"]][0] += 1
            gc_totals[info["generation"]][1] += pause
            if pause > 1:
                gc_pauses_ms.append((info["generation"], round(pause, 1)))

    gc.callbacks.append(on_gc)
    original = sse.Hub._dispatch

    def timed_dispatch(self: sse.Hub, entry_id: str, fields: dict[str, str]) -> None:
        started = time.time()
        original(self, entry_id, fields)
        dispatched[entry_id] = (started, time.time())

    sse.Hub._dispatch = timed_dispatch  # type: ignore[method-assign]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/__bench__/hub":
            body = json.dumps(
                {
                    "dispatched": dispatched,
                    "subscribers": sse._hub.subscriber_count if sse._hub else 0,
                    "threads": threading.active_count(),
                    "cpu_seconds": time.process_time(),
                    "rss_mb": rss_mb(),
                    "gc_pauses_over_1ms": list(gc_pauses_ms),
                    "gc_totals": {g: [n, round(ms, 1)] for g, (n, ms) in gc_totals.items()},
                }
            ).encode()
            dispatched.clear()
            gc_pauses_ms.clear()
            for totals in gc_totals.values():
                totals[:] = [0, 0.0]
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await application(scope, receive, send)

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        access_log=False,
        backlog=4096,
        loop=loop,
        http=http,
    )


# --- Writer process (--write) ------------------------------------------------------------------


def write_loop() -> None:
    """Set up a tenant, key, user and memory; then, per `write` line, commit one change and
    answer with its stream id and stamps (one JSON line each). At EOF, remove the user and key."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from memories import accounts, erasure, memory_writes
    from memories.events import publisher
    from memories.models import Memory
    from memories.providers.wiring import get_embedder

    call_command("migrate", verbosity=0)
    embedder = get_embedder()
    tenant = accounts.tenant_get_or_create(name="bench-sse")
    api_key, key = accounts.api_key_create(tenant=tenant, name="sse fan-out bench")
    user = accounts.end_user_create(tenant=tenant, external_id=f"sse-bench-{uuid.uuid4()}")
    memory = Memory.objects.create(
        tenant=tenant,
        user=user,
        content="bench change",
        embedding=embedder.embed(["bench change"])[0],
        content_hash=memory_writes.content_hash("bench change"),
    )
    sent: list[tuple[list[str], float, float]] = []
    original_send = publisher._send

    def timed_send(rows: list) -> list[str]:
        started = time.time()
        stream_ids = original_send(rows)
        sent.append((stream_ids, started, time.time()))
        return stream_ids

    publisher._send = timed_send  # bench-only: where the publish time goes
    print(json.dumps({"key": key, "user_id": str(user.id)}), flush=True)

    for n, line in enumerate(sys.stdin):
        if line.strip() != "write":
            break
        stamp: dict[str, float] = {}
        sent.clear()
        with transaction.atomic():
            transaction.on_commit(lambda stamp=stamp: stamp.setdefault("commit", time.time()))
            memory = memory_writes.memory_update(
                tenant_id=memory.tenant_id,
                memory_id=memory.id,
                embedder=embedder,
                content=f"bench change {n}",
            )
        [([stream_id], send_started, send_ended)] = sent
        reply = {"id": stream_id, "commit": stamp["commit"], "send_started": send_started,
                 "send_ended": send_ended}  # fmt: skip
        print(json.dumps(reply), flush=True)
    erasure.user_erasure_run(request_id=str(erasure.user_erasure_submit(user=user).id))
    api_key.delete()


# --- Subscribers --------------------------------------------------------------------------------


class Tracker:
    """Counts deliveries per stream id and wakes the driver when all subscribers have one."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.counts: dict[str, int] = {}
        self.waiting: dict[str, asyncio.Event] = {}

    def delivered(self, stream_id: str) -> None:
        count = self.counts[stream_id] = self.counts.get(stream_id, 0) + 1
        if count == self.subscribers and stream_id in self.waiting:
            self.waiting[stream_id].set()

    async def all_delivered(self, stream_id: str, timeout: float) -> None:
        if self.counts.get(stream_id, 0) >= self.subscribers:
            return
        done = self.waiting[stream_id] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        except TimeoutError:
            pass  # reported as missing deliveries


class Receipts:
    """What one subscriber received: stream id -> wall time the bytes were read."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.at: dict[str, float] = {}
        self.parse_seconds = 0.0
        self.subscribed = asyncio.Event()
        self._buffer = b""

    def feed(self, data: bytes, received_at: float) -> None:
        started = time.perf_counter()
        self._buffer += data
        *frames, self._buffer = self._buffer.split(b"\n\n")
        for frame in frames:
            if frame.startswith(b"id: "):
                stream_id = frame[4 : frame.index(b"\n")].decode()
                self.at[stream_id] = received_at
                self.tracker.delivered(stream_id)
            elif frame.startswith(b": subscribed"):
                self.subscribed.set()
        self.parse_seconds += time.perf_counter() - started


class Dechunker:
    """HTTP/1.1 chunked transfer coding undone: bytes in, the body's bytes out. A chunk is handed
    on once all of it has arrived (an SSE frame is one chunk, so it is received when complete)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        body = []
        while (line_end := self._buffer.find(b"\r\n")) >= 0:
            size = int(self._buffer[:line_end].split(b";", 1)[0], 16)
            start = line_end + 2
            if len(self._buffer) < start + size + 2:
                break
            body.append(self._buffer[start : start + size])
            self._buffer = self._buffer[start + size + 2 :]
        return b"".join(body)


class RawSSE(asyncio.Protocol):
    """An SSE client as a bare protocol (no StreamReader, no task): the least a Python client
    can do per delivery. HTTP/1.1 as browsers speak it, so the body comes chunked."""

    def __init__(self, receipts: Receipts, request: bytes) -> None:
        self.receipts, self.request = receipts, request
        self.head: bytes | None = b""
        self.dechunk: Dechunker | None = None  # None: the body is not chunked
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        received_at = time.time()
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"stream refused: {head!r}")
            if b"transfer-encoding: chunked" in head.lower():
                self.dechunk = Dechunker()
            self.head = None
        if self.dechunk is not None:
            data = self.dechunk.feed(data)
        self.receipts.feed(data, received_at)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def raw_subscriber(port: int, path: str, key: str, receipts: Receipts) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: RawSSE(receipts, request), "127.0.0.1", port
    )
    try:
        await protocol.closed
    finally:
        transport.close()


async def httpx_subscriber(port: int, path: str, key: str, receipts: Receipts) -> None:
    import httpx

    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
        client.stream(
            "GET", f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        response.raise_for_status()
        async for data in response.aiter_raw():
            receipts.feed(data, time.time())


# --- One round: N subscribers, E events ---------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    return {
        "p50": round(percentile(values_ms, 50), 3),
        "p99": round(percentile(values_ms, 99), 3),
        "max": round(max(values_ms), 3),
    }


async def hub_state(port: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=10.0) as client:
        return (await client.get(f"http://127.0.0.1:{port}/__bench__/hub")).json()


async def write_one(writer: asyncio.subprocess.Process) -> dict[str, Any]:
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(b"write\n")
    await writer.stdin.drain()
    async with asyncio.timeout(10):
        return json.loads(await writer.stdout.readline())


async def run_round(
    *,
    port: int,
    key: str,
    user_id: str,
    writer: asyncio.subprocess.Process,
    subscribers: int,
    events: int,
    kind: str,
) -> dict[str, Any]:
    path = f"/v1/stream?channels=user:{user_id}:memories"
    connect = raw_subscriber if kind == "raw" else httpx_subscriber
    tracker = Tracker(subscribers)
    receipts = [Receipts(tracker) for _ in range(subscribers)]
    wave = asyncio.Semaphore(CONNECT_WAVE)

    async def subscribe(r: Receipts) -> None:
        async with wave:
            task = asyncio.create_task(connect(port, path, key, r))
            async with asyncio.timeout(30):
                await r.subscribed.wait()
        await task

    connect_started = time.monotonic()
    tasks = [asyncio.create_task(subscribe(r)) for r in receipts]
    async with asyncio.timeout(90):
        for r in receipts:
            await r.subscribed.wait()
    connect_seconds = time.monotonic() - connect_started
    state = await hub_state(port)
    threads, server_cpu, server_rss = state["threads"], state["cpu_seconds"], state["rss_mb"]
    client_cpu = time.process_time()

    writes: list[dict[str, Any]] = []
    started = time.monotonic()
    for n in range(events + WARMUP_EVENTS):
        write = await write_one(writer)
        await tracker.all_delivered(write["id"], RECEIPT_DEADLINE_SECONDS)
        if n >= WARMUP_EVENTS:
            writes.append(write)
        await asyncio.sleep(0.005)  # let the server settle: latency, not throughput
    elapsed = time.monotonic() - started
    client_cpu = time.process_time() - client_cpu
    state = await hub_state(port)
    dispatched, server_cpu = state["dispatched"], state["cpu_seconds"] - server_cpu
    gc_pauses = state["gc_pauses_over_1ms"]
    gc_totals = state["gc_totals"]

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    left = -1
    for _ in range(100):  # the server notices the disconnects and drops the subscribers
        left = (await hub_state(port))["subscribers"]
        if left == 0:
            break
        await asyncio.sleep(0.05)

    latency, first, last, missing = [], [], [], 0
    commit_to_send, send_to_hub, hub_fanout, hub_to_client = [], [], [], []
    for write in writes:
        got = [r.at[write["id"]] for r in receipts if write["id"] in r.at]
        missing += subscribers - len(got)
        ms = [(t - write["commit"]) * 1000 for t in got]
        latency += ms
        if ms:
            first.append(min(ms))
            last.append(max(ms))
        commit_to_send.append((write["send_started"] - write["commit"]) * 1000)
        if write["id"] in dispatched:
            hub_started, hub_ended = dispatched[write["id"]]
            send_to_hub.append((hub_started - write["send_started"]) * 1000)
            hub_fanout.append((hub_ended - hub_started) * 1000)
            hub_to_client += [(t - hub_ended) * 1000 for t in got]
    parse_us = sum(r.parse_seconds for r in receipts) / max(1, len(latency)) * 1e6
    deliveries = max(1, (len(writes) + WARMUP_EVENTS) * subscribers)
    return {
        "subscribers": subscribers,
        "client": kind,
        "events_sent": len(writes),
        "deliveries": len(latency),
        "missing_deliveries": missing,
        "latency_ms": summary(latency),
        "first_subscriber_ms": summary(first),
        "last_subscriber_ms": summary(last),
        "breakdown_ms": {
            "commit_to_xadd_start": summary(commit_to_send),
            "xadd_publish_roundtrip": summary(
                [(w["send_ended"] - w["send_started"]) * 1000 for w in writes]
            ),
            "xadd_start_to_hub_dispatch": summary(send_to_hub),
            "hub_fanout_to_all_queues": summary(hub_fanout),
            "hub_dispatch_to_client_receipt": summary(hub_to_client),
        },
        "client_parse_us_per_delivery": round(parse_us, 2),
        # CPU of the whole round (all events, warm-up included) per delivery made.
        "server_cpu_us_per_delivery": round(server_cpu / deliveries * 1e6, 1),
        "client_cpu_us_per_delivery": round(client_cpu / deliveries * 1e6, 1),
        "connect_seconds": round(connect_seconds, 2),
        "round_seconds": round(elapsed, 2),
        "server_gc_pauses_over_1ms": {
            "count": len(gc_pauses),
            "max_ms": max((ms for _, ms in gc_pauses), default=0.0),
            "collections_and_ms_by_generation": gc_totals,
            "over_1ms_by_generation": {
                str(generation): sum(1 for g, _ in gc_pauses if g == generation)
                for generation in sorted({g for g, _ in gc_pauses})
            },
        },
        "server_threads_while_connected": threads,
        "server_rss_mb_while_connected": server_rss,
        "subscribers_left_after_disconnect": left,
    }


# --- Main ---------------------------------------------------------------------------------------


def uvicorn_choice(choice: str, *, fast: str, fallback: str) -> str:
    """What uvicorn's "auto" picks: the faster implementation when it is installed."""
    if choice != "auto":
        return choice
    return fast if find_spec(fast) else fallback


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_environment() -> dict[str, str]:
    from memoryproject import embedded

    var_dir = Path(os.environ.get("MEMORY_VAR_DIR", ROOT / "var"))
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = embedded.ensure_postgres(var_dir)
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = f"{embedded.ensure_redis(var_dir)}/{BENCH_REDIS_DB}"
    return dict(os.environ)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


async def drive(args: argparse.Namespace, env: dict[str, str], port: int) -> list[dict]:
    writer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--write", cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        async with asyncio.timeout(60):
            identity = json.loads(await writer.stdout.readline())
        rounds = []
        plan = [(n, "raw") for n in args.counts] + [(n, "httpx") for n in args.httpx_counts]
        for subscribers, kind in plan:
            events = args.events if subscribers < 1000 else max(20, args.events // 4)
            rounds.append(
                await run_round(
                    port=port,
                    key=identity["key"],
                    user_id=identity["user_id"],
                    writer=writer,
                    subscribers=subscribers,
                    events=events,
                    kind=kind,
                )
            )
        return rounds
    finally:
        assert writer.stdin is not None
        writer.stdin.close()  # EOF: the writer cleans up and exits
        try:
            async with asyncio.timeout(15):
                await writer.wait()
        except TimeoutError:
            writer.kill()
            await writer.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--counts", default="1,100,1000")
    parser.add_argument("--httpx-counts", default="1,100")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--loop", default=SERVER_LOOP, help="uvicorn --loop (asyncio, uvloop)")
    parser.add_argument("--http", default=SERVER_HTTP, help="uvicorn --http (h11, httptools)")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.loop, args.http)
    if args.write:
        return write_loop()
    args.counts = [int(n) for n in args.counts.split(",") if n]
    args.httpx_counts = [int(n) for n in args.httpx_counts.split(",") if n]
    logging.getLogger("httpx").setLevel(logging.WARNING)

    env = prepare_environment()
    loop_name = uvicorn_choice(args.loop, fast="uvloop", fallback="asyncio")
    http_name = uvicorn_choice(args.http, fast="httptools", fallback="h11")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--loop", args.loop, "--http", args.http],
        cwd=ROOT,
        env=env,
    )
    started = time.monotonic()
    try:
        wait_for_port(port, server)
        rounds = asyncio.run(drive(args, env, port))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    print(
        json.dumps(
            {
                "benchmark": "sse_fanout",
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                "server": f"uvicorn 1 process, --loop {loop_name} --http {http_name}",
                "latency": "subscriber's read returned - writer's COMMIT returned (wall clock)",
                "rounds": rounds,
                "total_seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
