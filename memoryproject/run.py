"""`make run`: the whole service in one terminal — web (ASGI), one Celery worker per lane, beat,
and the event consumers (audit, analytics, webhooks).

Starts embedded PostgreSQL and Redis first when DATABASE_URL / REDIS_URL are not set, migrates, then
supervises the processes: if one dies the others are stopped, and Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memoryproject import embedded

BASE_DIR = Path(__file__).resolve().parent.parent


WORKER_POOLS = ("prefork", "threads", "solo")
# The LLM lanes (`high`, `default`) wait on the network for almost all of a job: many jobs in flight
# in one process (threads) is what scales them, sized for a remote model (a 300 ms model and 64
# jobs in flight: ~100 jobs/s). The batch lane embeds and COPYs, CPU-bound: a process per job.
POOL_SETTINGS = {"WORKER_POOL": "threads", "BATCH_WORKER_POOL": "prefork"}
CONCURRENCY_SETTINGS = {
    "HIGH_WORKER_CONCURRENCY": "16",
    "WORKER_CONCURRENCY": "64",
    "BATCH_WORKER_CONCURRENCY": "1",
}
# Which settings each lane's worker takes.
LANES = {
    "high": ("WORKER_POOL", "HIGH_WORKER_CONCURRENCY"),
    "default": ("WORKER_POOL", "WORKER_CONCURRENCY"),
    "batch": ("BATCH_WORKER_POOL", "BATCH_WORKER_CONCURRENCY"),
}
DB_POOL_MAX_SIZE_DEFAULT = "10"  # as memoryproject/settings.py


class ConfigurationError(Exception):
    """A setting the runner reads has a value it cannot use; the message names it."""


def _whole_number(env: dict[str, str], name: str, default: str) -> int:
    value = env.get(name) or default
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 10_000):
        raise ConfigurationError(f"{name} must be a whole number from 1 to 10000; got {value!r}")
    return int(value)


def _checked_options(env: dict[str, str]) -> dict[str, str]:
    """Each lane's pool and concurrency, validated before anything starts."""
    options = {}
    for name, default in POOL_SETTINGS.items():
        pool = env.get(name) or default
        if pool not in WORKER_POOLS:
            allowed = ", ".join(WORKER_POOLS)
            raise ConfigurationError(f"{name} must be one of {allowed}; got {pool!r}")
        options[name] = pool
    for name, default in CONCURRENCY_SETTINGS.items():
        options[name] = str(_whole_number(env, name, default))
    options["DB_POOL_MAX_SIZE"] = str(
        _whole_number(env, "DB_POOL_MAX_SIZE", DB_POOL_MAX_SIZE_DEFAULT)
    )
    return options


def connections_wanted(options: dict[str, str]) -> int:
    """The most PostgreSQL connections the processes `make run` starts may open together: each
    process has a pool of up to DB_POOL_MAX_SIZE; a prefork worker is one process per job, a
    threads worker one process; web, beat and the consumers one process each (manage.py commands
    run beside them take one more pool each)."""
    processes = 3  # web, beat, consumers
    for pool_setting, concurrency_setting in LANES.values():
        forked = options[pool_setting] == "prefork"
        processes += int(options[concurrency_setting]) if forked else 1
    return processes * int(options["DB_POOL_MAX_SIZE"])


def _connections_allowed(database_url: str) -> int | None:
    """How many connections the server lets ordinary roles open (None if it cannot be asked)."""
    import psycopg

    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
                " - coalesce(current_setting('reserved_connections', true)::int, 0)"
            ).fetchone()
    except psycopg.Error:
        return None
    return row[0] if row else None


def _service_env() -> dict[str, str]:
    env = dict(os.environ)
    var_dir = embedded.var_dir(env)
    # Resolve the embedded servers and the key once here, so every child is handed the same.
    embedded.use_development_secret_key(env)
    embedded.use_embedded_servers(env)
    env.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")
    env["MEMORY_VAR_DIR"] = str(var_dir)
    # Every process writes its metrics here and the web process's /metrics sums them; the folder
    # is emptied at start, as prometheus_client requires.
    metrics_dir = var_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def main() -> int:
    try:
        options = _checked_options(dict(os.environ))
    except ConfigurationError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    try:
        env = _service_env()
    except embedded.EmbeddedServerError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    python = sys.executable
    # manage.py also reports a bad setting (one line) and exits 2: then nothing else starts.
    migrate = [python, "manage.py", "migrate", "--noinput"]
    if (migrated := subprocess.run(migrate, cwd=BASE_DIR, env=env)).returncode:
        return migrated.returncode
    wanted, allowed = connections_wanted(options), _connections_allowed(env["DATABASE_URL"])
    if allowed is not None and wanted > allowed:
        print(
            f"make run: warning: the processes' database pools may open {wanted} connections, "
            f"PostgreSQL allows {allowed}: raise its max_connections "
            "(EMBEDDED_POSTGRES_MAX_CONNECTIONS for the embedded one, then `make stop`) or lower "
            "DB_POOL_MAX_SIZE / the prefork concurrency",
            file=sys.stderr,
            flush=True,
        )

    celery = [python, "-m", "celery", "-A", "memoryproject"]

    def worker(lane: str) -> list[str]:
        # One worker per lane: a correction on `high` starts while `default` is saturated.
        pool_setting, concurrency_setting = LANES[lane]
        concurrency = options[concurrency_setting]
        arguments = ["-n", f"{lane}@%h", "-Q", lane, "--concurrency", concurrency]
        # `threads`: one process runs `concurrency` jobs at once, sharing one database pool, one
        # model client (keep-alive) and its call limit (LLM_MAX_CONCURRENCY).
        arguments += ["--pool", options[pool_setting]]
        return [*celery, "worker", *arguments, "--loglevel", "INFO"]

    schedule = str(Path(env["MEMORY_VAR_DIR"]) / "celerybeat-schedule")
    web = ["memoryproject.asgi:application", "--host", host, "--port", port, "--no-access-log"]
    commands = {
        "web": [python, "-m", "uvicorn", *web],
        "worker-high": worker("high"),
        "worker-default": worker("default"),
        "worker-batch": worker("batch"),
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule", schedule],
        "consumers": [python, "manage.py", "consume_events"],
    }
    processes = {
        name: subprocess.Popen(command, cwd=BASE_DIR, env=env) for name, command in commands.items()
    }
    print(
        f"\n  Memory service on http://{host}:{port}/  (admin: http://{host}:{port}/admin/)\n"
        f"  Every /v1 call needs 'Authorization: Bearer <key>'. Get a key with:\n"
        f"    .venv/bin/python manage.py createapikey --tenant demo\n"
        f"  Metrics: http://{host}:{port}/metrics   Ctrl-C stops the service; the embedded\n"
        f"  PostgreSQL and Redis keep running for manage.py and the next start (`make stop`).\n",
        flush=True,
    )

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, process in processes.items():
            if process.poll() is not None:
                print(f"{name} exited with {process.returncode}; stopping the others", flush=True)
                exit_code = process.returncode or 1
                stopping = True
        time.sleep(0.5)

    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # warm shutdown: workers finish or return jobs
    deadline = time.monotonic() + 30
    for process in processes.values():
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
