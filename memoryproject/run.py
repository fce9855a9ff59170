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
CONCURRENCY_SETTINGS = {
    "HIGH_WORKER_CONCURRENCY": "1",
    "WORKER_CONCURRENCY": "2",
    "BATCH_WORKER_CONCURRENCY": "1",
}


class ConfigurationError(Exception):
    """A setting the runner reads has a value it cannot use; the message names it."""


def _checked_options(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The worker pool and each lane's concurrency, validated before anything starts."""
    pool = env.get("WORKER_POOL") or "prefork"
    if pool not in WORKER_POOLS:
        allowed = ", ".join(WORKER_POOLS)
        raise ConfigurationError(f"WORKER_POOL must be one of {allowed}; got {pool!r}")
    concurrency = {}
    for name, default in CONCURRENCY_SETTINGS.items():
        value = env.get(name) or default
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 10_000):
            message = f"{name} must be a whole number from 1 to 10000; got {value!r}"
            raise ConfigurationError(message)
        concurrency[name] = str(int(value))
    return pool, concurrency


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
        pool, concurrency = _checked_options(dict(os.environ))
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

    celery = [python, "-m", "celery", "-A", "memoryproject"]

    def worker(lane: str, concurrency: str) -> list[str]:
        # One worker per lane: a correction on `high` starts while `default` is saturated.
        options = ["-n", f"{lane}@%h", "-Q", lane, "--concurrency", concurrency]
        # `threads` lets the jobs of one worker share embedding calls (EMBEDDING_BATCH_WINDOW_MS).
        options += ["--pool", pool]
        return [*celery, "worker", *options, "--loglevel", "INFO"]

    schedule = str(Path(env["MEMORY_VAR_DIR"]) / "celerybeat-schedule")
    web = ["memoryproject.asgi:application", "--host", host, "--port", port, "--no-access-log"]
    commands = {
        "web": [python, "-m", "uvicorn", *web],
        "worker-high": worker("high", concurrency["HIGH_WORKER_CONCURRENCY"]),
        "worker-default": worker("default", concurrency["WORKER_CONCURRENCY"]),
        "worker-batch": worker("batch", concurrency["BATCH_WORKER_CONCURRENCY"]),
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
