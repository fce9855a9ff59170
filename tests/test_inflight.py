"""Many jobs in flight in one worker process: they overlap their model calls while the database
connections stay within the process's pool; the model endpoint is pressed within a limit and left
alone while it says it is rate-limited; a threads worker killed or stopped mid-burst loses nothing
and applies nothing twice."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from memories import accounts
from memories.models import Memory, MemoryRequest
from memories.providers import ProviderError
from memories.providers.openai_provider import OpenAILLM
from memories.providers.wiring import get_embedder, get_llm
from memoryproject import embedded, run
from tests.fake_openai import FakeOpenAI, FakeResponse, rule_based_chat
from tests.helpers import model_env, submit_job, wait_for


class CountingModel:
    """A chat handler that answers like the rule-based model after `seconds`, and records how
    many calls were in its hands at once, and when each arrived and was answered."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0
        self.most_in_flight = 0
        self.calls: list[tuple[float, float]] = []  # (arrived, answered), monotonic
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str | FakeResponse:
        arrived = time.monotonic()
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.seconds)
            return rule_based_chat(body)  # type: ignore[return-value]
        finally:
            with self._lock:
                self.in_flight -= 1
                self.calls.append((arrived, time.monotonic()))


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def in_threads(count: int, target: Any) -> list[BaseException]:
    """Run `target(n)` in `count` threads at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def run_one(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    threads = [threading.Thread(target=run_one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


# --- The provider: a call limit per process, and a 429 pauses every thread ---------------------


def test_calls_from_many_threads_stay_within_the_providers_limit() -> None:
    model = CountingModel(seconds=0.1)
    with FakeOpenAI(chat_handler=model) as fake:
        llm = OpenAILLM(
            api_key="k", base_url=fake.base_url, model="m", max_retries=0, max_concurrency=3
        )
        errors = in_threads(12, lambda n: llm.extract_facts(said(f"I live in City{n}.")))
    assert errors == []
    assert len(model.calls) == 12
    assert model.most_in_flight == 3  # twelve threads, never more than three calls at once


def test_a_429_holds_back_every_threads_calls_for_its_retry_after_then_one_probes_first() -> None:
    model = CountingModel(seconds=0.05)
    with FakeOpenAI(chat_handler=model) as fake:
        llm = OpenAILLM(
            api_key="k", base_url=fake.base_url, model="m", max_retries=0, max_concurrency=8
        )
        fake.fail_next(1, status=429, headers={"retry-after-ms": "500"})
        before = time.monotonic()
        with pytest.raises(ProviderError, match="HTTP 429"):
            llm.extract_facts(said("I live in Paris."))
        errors = in_threads(8, lambda n: llm.extract_facts(said(f"I live in City{n}.")))
    assert errors == []
    answered = sorted(model.calls)
    assert len(answered) == 8
    # No thread called before the endpoint's Retry-After had passed...
    assert answered[0][0] >= before + 0.5
    # ...and then one call went first, alone: the others waited for its answer.
    assert answered[0][1] <= answered[1][0]


def test_a_429_asking_for_more_than_two_minutes_fails_the_call_and_pauses_the_endpoint() -> None:
    with FakeOpenAI() as fake:
        llm = OpenAILLM(api_key="k", base_url=fake.base_url, model="m", max_retries=3)
        fake.fail_next(1, status=429, headers={"retry-after": "600"})
        with pytest.raises(ProviderError, match="HTTP 429"):
            llm.extract_facts(said("I live in Paris."))  # the job retries later, not this thread
        assert len(fake.requests) == 1
    paused_for = llm._endpoint.throttle._resume_at - time.monotonic()  # type: ignore[attr-defined]
    assert 100 < paused_for <= 120  # every thread's calls wait, up to two minutes


def test_a_processs_llm_and_embedder_share_one_client_and_its_keep_alive_connection(
    openai_settings,
) -> None:
    llm, embedder = get_llm(), get_embedder()
    assert llm._endpoint.client is embedder._endpoint.client  # type: ignore[attr-defined]
    for n in range(3):
        llm.extract_facts(said(f"I live in City{n}."))
        embedder.embed([f"Lives in City{n}"])
    port = int(openai_settings.base_url.split(":")[2].split("/")[0])
    opened = [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]
    assert len(opened) == 1  # six calls, one connection


# --- A threads worker: many jobs in flight over a small pool -------------------------------------


def _worker_sessions() -> set[int]:
    """The backends of the worker under test (its DATABASE_URL names it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'inflight-worker'"
        )
        return {row[0] for row in cursor.fetchall()}


@pytest.mark.django_db(transaction=True)
def test_a_threads_worker_overlaps_many_jobs_model_calls_within_a_pool_of_three(
    tenant, start_worker, worker_env
) -> None:
    model = CountingModel(seconds=0.4)
    with FakeOpenAI(dimensions=settings.EMBEDDING_DIMENSIONS, chat_handler=model) as fake:
        start_worker(
            queues="default",
            concurrency=16,
            pool="threads",
            DB_POOL_MAX_SIZE="3",
            DATABASE_URL=worker_env["DATABASE_URL"] + "?application_name=inflight-worker",
            **model_env(fake),
        )
        users = [accounts.end_user_create(tenant=tenant, external_id=f"u{n}") for n in range(12)]
        requests = [submit_job(user, f"I live in City{n}.") for n, user in enumerate(users)]
        most_connections = 0
        sessions: set[int] = set()

        def finished() -> bool:
            nonlocal most_connections
            now = _worker_sessions()
            most_connections = max(most_connections, len(now))
            sessions.update(now)
            done = MemoryRequest.objects.filter(pk__in=[r.pk for r in requests])
            return done.filter(status="success").count() == len(requests)

        wait_for(finished, timeout=60, what="the twelve jobs")
    assert most_connections <= 3
    assert len(sessions) <= 3  # the same pooled sessions all along: none opened per job
    # With a connection held across its model calls, three jobs at most could have been waiting
    # on the model at once.
    assert model.most_in_flight >= 6, model.most_in_flight
    assert Memory.objects.filter(user__in=users).count() == 12


@pytest.mark.django_db(transaction=True)
def test_a_threads_worker_killed_with_jobs_in_flight_loses_none_and_applies_each_once(
    tenant, start_worker
) -> None:
    with FakeOpenAI(delay_seconds=2, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        env = {
            **model_env(fake),
            "MEMORY_JOB_LEASE_SECONDS": "2",
            "MEMORY_PENDING_GRACE_SECONDS": "1",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
        }
        doomed = start_worker(queues="default", concurrency=8, pool="threads", **env)
        users = [accounts.end_user_create(tenant=tenant, external_id=f"u{n}") for n in range(6)]
        requests = [submit_job(user, f"I live in City{n}.") for n, user in enumerate(users)]
        ids = [r.pk for r in requests]
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="processing").count() >= 4,
            what="jobs in flight",
        )
        in_flight = set(
            MemoryRequest.objects.filter(pk__in=ids, status="processing").values_list(
                "pk", flat=True
            )
        )
        doomed.kill()  # SIGKILL: every job in flight in the process is lost at once

        fake.delay_seconds = 0
        start_worker(queues="default,high", concurrency=8, pool="threads", with_beat=True, **env)
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="success").count() == 6,
            timeout=60,
            what="every job after the restart",
        )
    attempts = dict(MemoryRequest.objects.filter(pk__in=ids).values_list("pk", "attempts"))
    assert all(attempts[pk] == 2 for pk in in_flight), attempts  # reclaimed after the lease
    contents = sorted(Memory.objects.filter(user__in=users).values_list("content", flat=True))
    assert contents == sorted(f"Lives in City{n}" for n in range(6))  # each applied once


@pytest.mark.django_db(transaction=True)
def test_a_threads_worker_stopped_mid_burst_finishes_its_jobs_and_returns_the_rest(
    tenant, start_worker
) -> None:
    with FakeOpenAI(delay_seconds=1, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        first = start_worker(queues="default", concurrency=4, pool="threads", **model_env(fake))
        users = [accounts.end_user_create(tenant=tenant, external_id=f"u{n}") for n in range(10)]
        requests = [submit_job(user, f"I live in City{n}.") for n, user in enumerate(users)]
        ids = [r.pk for r in requests]
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="processing").count() == 4,
            what="four jobs in flight",
        )
        in_flight = set(
            MemoryRequest.objects.filter(pk__in=ids, status="processing").values_list(
                "pk", flat=True
            )
        )
        first.stop()  # SIGTERM: Celery's warm shutdown
        assert first.process.returncode == 0, first.output()[-2000:]
        done = set(
            MemoryRequest.objects.filter(pk__in=ids, status="success").values_list("pk", flat=True)
        )
        assert in_flight <= done  # the jobs running at SIGTERM were finished
        assert not MemoryRequest.objects.filter(pk__in=ids, status="processing").exists()
        assert len(done) < len(ids)  # and the others were left for the next worker

        fake.delay_seconds = 0
        start_worker(queues="default", concurrency=4, pool="threads", **model_env(fake))
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="success").count() == 10,
            what="the returned jobs",
        )
    assert set(MemoryRequest.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}
    assert Memory.objects.filter(user__in=users).count() == 10


# --- make run's pools -----------------------------------------------------------------------------


def test_make_run_puts_the_llm_lanes_on_threads_and_the_batch_lane_on_prefork() -> None:
    options = run._checked_options({})
    assert options["WORKER_POOL"] == "threads" and options["BATCH_WORKER_POOL"] == "prefork"
    assert int(options["WORKER_CONCURRENCY"]) >= 64


def test_the_connections_make_run_may_open_count_each_process_pool() -> None:
    # web, beat, consumers, one process per threads lane, one per prefork job: 10 each.
    assert run.connections_wanted(run._checked_options({})) == 6 * 10
    prefork = run._checked_options(
        {"WORKER_POOL": "prefork", "WORKER_CONCURRENCY": "4", "DB_POOL_MAX_SIZE": "5"}
    )
    assert run.connections_wanted(prefork) == (3 + 16 + 4 + 1) * 5


# --- The embedded PostgreSQL's room for those pools --------------------------------------------


def _max_connections(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    assert row is not None
    return row[0]


def test_the_embedded_postgresql_starts_with_the_configured_max_connections(
    tmp_path, monkeypatch
) -> None:
    var_dir = tmp_path / "var"
    monkeypatch.setenv("EMBEDDED_POSTGRES_MAX_CONNECTIONS", "37")
    try:
        assert _max_connections(embedded.ensure_postgres(var_dir)) == 37  # a new data directory
        embedded.stop_postgres(var_dir)
        monkeypatch.setenv("EMBEDDED_POSTGRES_MAX_CONNECTIONS", "41")
        assert _max_connections(embedded.ensure_postgres(var_dir)) == 41  # started again
    finally:
        embedded.stop_postgres(var_dir)
    assert embedded.max_connections({}) == 200  # room for make run's pools, manage.py, tests
    with pytest.raises(embedded.EmbeddedServerError, match="EMBEDDED_POSTGRES_MAX_CONNECTIONS"):
        embedded.max_connections({"EMBEDDED_POSTGRES_MAX_CONNECTIONS": "lots"})
