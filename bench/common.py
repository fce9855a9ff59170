"""Shared plumbing for the benchmarks: a dedicated database and Redis db, real server processes
(uvicorn, Celery workers) that are always cleaned up, tenants/keys/users, and measurements
(percentiles, CPU and memory of process trees).

Every bench runs against its own PostgreSQL database `memory_bench` (dropped and recreated at
start, on the same server as the dev database) and Redis db 15 (flushed at start), so dev data
is never touched. Offline model providers are forced, so nothing leaves 127.0.0.1.

Also an entry point: `python bench/common.py celery-worker <celery worker args>` runs a Celery
worker that touches $BENCH_READY_FILE once it consumes (at WARNING log level Celery prints no
"ready" line to wait for).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

BENCH_DATABASE = os.environ.get("BENCH_DATABASE", "memory_bench")
BENCH_REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "15"))


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the final JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, default=str), flush=True)


# --- Percentiles and rates -----------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max in milliseconds, rounded for reading."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "n": len(seconds),
        "p50_ms": ms(percentile(seconds, 50)),
        "p90_ms": ms(percentile(seconds, 90)),
        "p99_ms": ms(percentile(seconds, 99)),
        "max_ms": ms(max(seconds) if seconds else None),
    }


# --- Total runtime cap and cleanup ---------------------------------------------------------------


class BenchTimeout(Exception):
    """The bench ran past its total runtime cap."""


def install_runtime_cap(seconds: float) -> None:
    """Raise BenchTimeout in the main thread after `seconds`, and turn SIGTERM into SystemExit, so
    `finally` blocks (which stop our processes) run whatever ends the bench."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"total runtime cap of {seconds:.0f}s reached")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (`cmd &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def run_main(name: str, main: Callable[[], dict[str, Any]]) -> None:
    """Run a bench's main and print its result; on any failure print {"benchmark", "error"}
    instead (still one JSON object) and exit non-zero. The servers are stopped either way."""
    try:
        result = main()
    except (Exception, KeyboardInterrupt, SystemExit) as exc:  # runtime cap, Ctrl-C, SIGTERM
        stop_all()
        if isinstance(exc, Exception):
            traceback.print_exc(file=sys.stderr)
        emit({"benchmark": name, "error": f"{type(exc).__name__}: {exc}"})
        if isinstance(exc, KeyboardInterrupt):
            sys.exit(130)
        sys.exit(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
    emit(result)


_started: list[ManagedProcess] = []


@dataclass
class ManagedProcess:
    """A child in its own session (so one killpg reaches its whole tree: uvicorn's workers,
    Celery's pool), logging to a file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the group (warm shutdown), then SIGKILL what is left after `timeout`."""
        if self in _started:
            _started.remove(self)
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop in {timeout}s; killing it")
        # The leader may be gone while its children linger: kill the group regardless.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def stop_all() -> None:
    """Stop every process this bench started, newest first. The runtime cap is disarmed first:
    it must not cut the cleanup itself short."""
    with contextlib.suppress(ValueError):  # not in the main thread: nothing to disarm
        signal.setitimer(signal.ITIMER_REAL, 0)
    for process in list(reversed(_started)):
        try:
            process.stop()
        except Exception as exc:  # cleanup goes on with the others
            log(f"stopping {process.name} failed: {exc}")


atexit.register(stop_all)

_log_dir: Path | None = None


def _logs() -> Path:
    global _log_dir
    if _log_dir is None:
        _log_dir = Path(tempfile.mkdtemp(prefix="memory-bench-"))
        # Logs are kept only when asked: a finished bench leaves nothing behind.
        if not os.environ.get("BENCH_KEEP_LOGS"):
            atexit.register(shutil.rmtree, _log_dir, True)
    return _log_dir


def spawn(
    name: str, command: list[str], env: dict[str, str], *, cwd: Path | None = None
) -> ManagedProcess:
    """`cwd`: the source tree the process imports the project from (this one by default; a
    bench comparing with another version of the code names that version's tree)."""
    log_path = _logs() / f"{name}-{len(_started)}.log"
    with open(log_path, "w") as handle:
        popen = subprocess.Popen(
            command,
            cwd=cwd or ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = ManagedProcess(name, popen, log_path)
    _started.append(process)
    return process


def _wait_until(check: Callable[[], bool], process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not ready in {timeout}s:\n{process.log_tail()}")
        time.sleep(0.1)


# --- Environment: dedicated database and Redis db ------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _with_path(url: str, path: str, *, keep_query: bool = True) -> str:
    parts = urlsplit(url)
    query = parts.query if keep_query else ""
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


@dataclass
class BenchEnv:
    """What every bench process and its children share."""

    var_dir: Path
    database_url: str
    redis_url: str
    env: dict[str, str] = field(default_factory=dict)

    def with_settings(self, **overrides: Any) -> dict[str, str]:
        """The children's environment with some settings changed (values stringified)."""
        return {**self.env, **{key: str(value) for key, value in overrides.items()}}


def prepare(settings: dict[str, Any] | None = None, *, fresh: bool = True) -> BenchEnv:
    """Resolve the servers, recreate `memory_bench`, migrate it, flush Redis db 15, configure this
    process (os.environ) with the same settings as its children, and call django.setup().
    `settings` override the bench's defaults; a value of None unsets the variable."""
    from memoryproject import embedded

    var_dir = Path(os.environ.get("MEMORY_VAR_DIR", ROOT / "var"))
    # The base URLs name the dev database / db; the bench swaps them for its own.
    base_db = os.environ.get("DATABASE_URL") or embedded.ensure_postgres(var_dir)
    base_redis = os.environ.get("REDIS_URL") or embedded.ensure_redis(var_dir)
    if urlsplit(base_db).path.strip("/") == BENCH_DATABASE:
        raise RuntimeError(f"{BENCH_DATABASE} is the dev database: refusing to drop it")
    database_url = _with_path(base_db, f"/{BENCH_DATABASE}")
    redis_url = _with_path(base_redis, f"/{BENCH_REDIS_DB}")
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # never write into `make run`'s metrics folder
    env.update(
        DJANGO_SETTINGS_MODULE="memoryproject.settings",
        MEMORY_VAR_DIR=str(var_dir),
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        LOG_LEVEL="WARNING",
        LOG_FORMAT="plain",
        RATE_LIMIT_PER_SECOND="0",
        # Offline providers whatever the caller's shell holds: no network, instant fake LLM.
        LLM_PROVIDER="offline",
        EMBEDDING_PROVIDER="offline",
        OPENAI_API_KEY="",
        PYTHONUNBUFFERED="1",
    )
    unset = [key for key, value in (settings or {}).items() if value is None]
    for key in unset:  # None: the setting's own default (what `make run` would use)
        env.pop(key, None)
        os.environ.pop(key, None)
    env.update({key: str(value) for key, value in (settings or {}).items() if value is not None})
    embedded.use_development_secret_key(env)  # the dev key under var/, as make run uses
    bench = BenchEnv(var_dir=var_dir, database_url=database_url, redis_url=redis_url, env=env)
    if fresh:
        _recreate_database(base_db)
        _migrate(bench)
        _flush_redis(redis_url)
    os.environ.update(env)
    import django

    django.setup()
    return bench


def _recreate_database(base_url: str) -> None:
    import psycopg

    log(f"recreating database {BENCH_DATABASE}")
    # Without the query string: it may hold Django-only options (`?pool=true`).
    maintenance = _with_path(base_url, "/postgres", keep_query=False)
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')


def _migrate(bench: BenchEnv) -> None:
    log("migrating")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=bench.env,
        check=True,
        stdout=sys.stderr,
    )


def _flush_redis(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def raw_connection(bench: BenchEnv) -> Any:
    """A plain autocommit psycopg connection: polling through it costs less than the ORM."""
    import psycopg

    url = _with_path(bench.database_url, f"/{BENCH_DATABASE}", keep_query=False)
    return psycopg.connect(url, autocommit=True)


def pg_connections(bench: BenchEnv) -> int:
    """Connections open right now to the bench database (this reading's own included)."""
    with raw_connection(bench) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [BENCH_DATABASE]
        ).fetchone()
    return int(row[0])


def pg_sessions(bench: BenchEnv) -> int:
    """Sessions ever opened on the bench database (pg_stat_database, PostgreSQL 14+): the delta
    over a run shows whether connections are reused or opened per request."""
    with raw_connection(bench) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", [BENCH_DATABASE]
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# --- Servers -------------------------------------------------------------------------------------


@dataclass
class WebServer:
    process: ManagedProcess
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_web(
    bench: BenchEnv,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> WebServer:
    """uvicorn on the project's ASGI app, `--workers N`, on a free loopback port (the project as
    `cwd`, a source tree, holds it: this one by default)."""
    import httpx

    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "memoryproject.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    process = spawn(f"web-x{workers}", command, env or bench.env, cwd=cwd)
    url = f"http://127.0.0.1:{port}/healthz"

    def healthy() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_until(healthy, process, timeout=60)
    if workers > 1:
        # /healthz answered by one worker: give the others a moment to finish importing Django.
        _wait_until(lambda: len(_tree(process.pid)) >= workers + 1, process, timeout=30)
        time.sleep(1.5)
    log(f"web up on port {port} with {workers} worker(s)")
    return WebServer(process, port)


def start_worker(
    bench: BenchEnv, *, lane: str, concurrency: int = 1, env: dict[str, str] | None = None
) -> ManagedProcess:
    """A Celery worker on one lane (as `make run` starts them), ready to consume on return."""
    ready_file = _logs() / f"ready-{lane}-{uuid.uuid4().hex}"
    command = [
        sys.executable, str(Path(__file__).resolve()), "celery-worker",
        "-Q", lane, "-n", f"bench-{lane}-{uuid.uuid4().hex[:8]}@%h",
        "--concurrency", str(concurrency), "--pool", "prefork",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    worker_env = {**(env or bench.env), "BENCH_READY_FILE": str(ready_file)}
    process = spawn(f"worker-{lane}", command, worker_env)
    _wait_until(ready_file.exists, process, timeout=60)
    log(f"worker on {lane} ready (concurrency {concurrency})")
    return process


def start_beat(bench: BenchEnv, env: dict[str, str] | None = None) -> ManagedProcess:
    """Celery beat as `make run` starts it (the sweeper re-sends lost jobs on the `high` lane),
    with its schedule file in the bench's temporary folder."""
    command = [
        sys.executable, "-m", "celery", "-A", "memoryproject", "beat",
        "--schedule", str(_logs() / "celerybeat-schedule"), "--loglevel", "WARNING",
    ]  # fmt: skip
    process = spawn("beat", command, env or bench.env)
    log("beat started")
    return process


def _celery_worker_main(argv: list[str]) -> None:
    """The worker entry point: Celery's own, plus a ready file once it consumes."""
    from celery.signals import worker_ready

    ready_file = os.environ["BENCH_READY_FILE"]

    @worker_ready.connect(weak=False)
    def _mark_ready(**kwargs: Any) -> None:
        Path(ready_file).write_text(str(os.getpid()))

    from memoryproject.celery import app

    app.worker_main(["worker", *argv])


# --- Tenant, key, users --------------------------------------------------------------------------


@dataclass
class Tenancy:
    tenant: Any
    api_key: str
    user_ids: list[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def create_tenancy(name: str, users: int) -> Tenancy:
    """A tenant with a fresh API key and `users` end users, through the services (after setup)."""
    from memories import accounts

    tenant = accounts.tenant_get_or_create(name=f"{name}-{uuid.uuid4().hex[:8]}")
    _, raw_key = accounts.api_key_create(tenant=tenant, name="bench")
    user_ids = [str(accounts.end_user_create(tenant=tenant).id) for _ in range(users)]
    return Tenancy(tenant, raw_key, user_ids)


# --- Process trees: CPU and memory ---------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    """The process and its descendants; for this very process, itself alone (the servers it
    started are its children, and are measured on their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        if pid == os.getpid():
            return [root]
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its live descendants, plus children they reaped (so a
    PostgreSQL backend that exits mid-measurement still counts, in the postmaster)."""
    import psutil

    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = process.cpu_times()
            total += t.user + t.system
            if process.pid != os.getpid():
                total += t.children_user + t.children_system
    return total


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS summed over the tree, in MB. PSS shares each shared page among its users, so
    PostgreSQL's shared buffers are not counted once per backend as RSS sums would."""
    import psutil

    rss = pss = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return {"rss_mb": round(rss / 2**20, 1), "pss_mb": round(pss / 2**20, 1)}


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_listening_on(port: int) -> int | None:
    import psutil

    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return conn.pid
    return None


def server_pids(bench: BenchEnv) -> dict[str, int]:
    """The embedded PostgreSQL postmaster and Redis server (shared with dev: their figures
    include whatever else uses them). External servers are not found, and left out."""
    pids: dict[str, int] = {}
    postgres = _pid_from_file(bench.var_dir / "postgres" / "postmaster.pid")
    if postgres:
        pids["postgres"] = postgres
    redis_pid = _pid_from_file(bench.var_dir / "redis" / "redis.pid")
    port = urlsplit(bench.redis_url).port
    if redis_pid is None and port:
        redis_pid = _pid_listening_on(port)
    if redis_pid:
        pids["redis"] = redis_pid
    return pids


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if name in after}


class MemorySampler:
    """Samples every tree's memory once per `interval` in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        """Seconds since the sampler started: the clock its samples are timed by."""
        return time.monotonic() - self.started

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            reading = {name: tree_memory_mb(pid) for name, pid in self.pids.items()}
            self.samples.append((self.elapsed(), reading))
            self._stop.wait(self.interval)

    def summary(self, window: tuple[float, float] | None = None, edge: float = 10.0) -> dict:
        """Per tree: max RSS/PSS, and the growth of the mean PSS between the first and the last
        `edge` seconds of `window` (seconds since the sampler started; default all)."""
        start, end = window or (0.0, self.samples[-1][0] if self.samples else 0.0)
        inside = [(t, r) for t, r in self.samples if start <= t <= end]
        result: dict[str, Any] = {}
        for name in self.pids:
            series = [(t, r[name]) for t, r in inside if name in r]
            if not series:
                continue
            first = [m["pss_mb"] for t, m in series if t <= start + edge]
            last = [m["pss_mb"] for t, m in series if t >= end - edge]
            first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
            middle = [m["pss_mb"] for t, m in series if abs(t - (start + end) / 2) <= edge / 2]
            result[name] = {
                "max_rss_mb": max(m["rss_mb"] for _, m in series),
                "max_pss_mb": max(m["pss_mb"] for _, m in series),
                "first_10s_pss_mb": round(first_mean, 1),
                "last_10s_pss_mb": round(last_mean, 1),
                "growth_pss_mb": round(last_mean - first_mean, 1),
                # Warm-up (caches, pools) grows early and stops; a leak keeps growing late too.
                "growth_second_half_pss_mb": round(last_mean - sum(middle) / len(middle), 1)
                if middle
                else None,
                "pss_mb_every_10s": _every(series, start, 10.0),
                "samples": len(series),
            }
        return result


def _every(series: list[tuple[float, dict[str, float]]], start: float, step: float) -> list:
    """Mean PSS per `step`-second bucket: the shape of the curve, in a few numbers."""
    buckets: dict[int, list[float]] = {}
    for t, reading in series:
        buckets.setdefault(int((t - start) // step), []).append(reading["pss_mb"])
    return [round(sum(v) / len(v), 1) for _, v in sorted(buckets.items())]


# --- HTTP ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def http_client(base_url: str, headers: dict[str, str], timeout: float = 60) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
        yield client


# --- Memory jobs over HTTP ------------------------------------------------------------------------


def job_messages(tag: str, n: int) -> list[dict[str, str]]:
    """One user message with one or two plain first-person facts, distinct per job."""
    text = f"I like hobby{tag}x{n}."
    if n % 2:
        text += f" I play sport{tag}x{n}."
    return [{"role": "user", "content": text}]


def submit_jobs(
    web: WebServer, tenancy: Tenancy, tag: str, jobs: int, clients: int
) -> tuple[list[str], list[float], int]:
    """POST every job; return the request ids, the POST latencies and the non-202 count."""
    request_ids: list[str] = []
    latencies: list[float] = []
    refused = [0]
    lock = threading.Lock()

    def client(offset: int) -> None:
        with http_client(web.base_url, tenancy.headers) as http:
            for n in range(offset, jobs, clients):
                body = {
                    "user_id": tenancy.user_ids[n % len(tenancy.user_ids)],
                    "messages": job_messages(tag, n),
                }
                started = time.monotonic()
                response = http.post("/v1/memories", json=body)
                elapsed = time.monotonic() - started
                with lock:
                    latencies.append(elapsed)
                    if response.status_code == 202:
                        request_ids.append(response.json()["request_id"])
                    else:
                        refused[0] += 1
                        log(f"POST {response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return request_ids, latencies, refused[0]


def wait_requests_finished(
    bench: BenchEnv, request_ids: list[str], timeout: float
) -> tuple[int, int, float | None]:
    """Poll until every request is finished (bounded); return (successes, failures, the last
    finished_at as a Unix time)."""
    query = """SELECT count(*) FILTER (WHERE status = 'success'),
                      count(*) FILTER (WHERE status = 'failure'),
                      extract(epoch FROM max(finished_at))
               FROM memories_memoryrequest WHERE id = ANY(%s::uuid[])"""
    deadline = time.monotonic() + timeout
    with raw_connection(bench) as conn:
        while True:
            success, failure, last = conn.execute(query, [request_ids]).fetchone()
            if success + failure >= len(request_ids) or time.monotonic() > deadline:
                return success, failure, float(last) if last is not None else None
            time.sleep(0.05)


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "celery-worker":
        _celery_worker_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/common.py celery-worker <celery worker options>")
