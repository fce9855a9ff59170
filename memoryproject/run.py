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

BASE_DIR = Path(__file__).resolve().parent.parent


def _service_env() -> dict[str, str]:
    from memoryproject import embedded

    env = dict(os.environ)
    var_dir = Path(env.get("MEMORY_VAR_DIR", BASE_DIR / "var"))
    # Resolve the embedded servers once here, so every child is handed the same URLs.
    if not env.get("DATABASE_URL"):
        env["DATABASE_URL"] = embedded.ensure_postgres(var_dir)
    if not env.get("REDIS_URL"):
        env["REDIS_URL"] = embedded.ensure_redis(var_dir) + "/0"
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
    env = _service_env()
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=env, check=True)

    celery = [python, "-m", "celery", "-A", "memoryproject"]

    def worker(lane: str, concurrency: str) -> list[str]:
        # One worker per lane: a correction on `high` starts while `default` is saturated.
        options = ["-n", f"{lane}@%h", "-Q", lane, "--concurrency", concurrency]
        # `threads` lets the jobs of one worker share embedding calls (EMBEDDING_BATCH_WINDOW_MS).
        options += ["--pool", env.get("WORKER_POOL", "prefork")]
        return [*celery, "worker", *options, "--loglevel", "INFO"]

    schedule = str(Path(env["MEMORY_VAR_DIR"]) / "celerybeat-schedule")
    web = ["memoryproject.asgi:application", "--host", host, "--port", port, "--no-access-log"]
    commands = {
        "web": [python, "-m", "uvicorn", *web],
        "worker-high": worker("high", env.get("HIGH_WORKER_CONCURRENCY", "1")),
        "worker-default": worker("default", env.get("WORKER_CONCURRENCY", "2")),
        "worker-batch": worker("batch", env.get("BATCH_WORKER_CONCURRENCY", "1")),
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
        f"  Metrics: http://{host}:{port}/metrics   Ctrl-C stops everything.\n",
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
