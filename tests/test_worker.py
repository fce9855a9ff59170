"""Real Celery workers over real Redis: jobs survive crashes, lost messages and redelivery."""

from __future__ import annotations

import time

import psutil
import pytest
import redis
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from memories.models import EndUser, Memory, MemoryRequest
from tasks.memory_jobs import process_memory_request
from tests.fake_openai import FakeOpenAI
from tests.helpers import model_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(request_id: str) -> str:
    return MemoryRequest.objects.get(pk=request_id).status


def post_job(api: APIClient, user: EndUser, text: str) -> str:
    response = api.post(
        "/v1/memories",
        {"user_id": str(user.id), "messages": [{"role": "user", "content": text}]},
        format="json",
    )
    assert response.status_code == 202, response.content
    return response.json()["request_id"]


def test_real_worker_carries_a_job_from_post_to_success(api, end_user, start_worker) -> None:
    start_worker()
    request_id = post_job(api, end_user, "I live in Paris. I like hiking.")
    wait_for(lambda: status_of(request_id) == "success", what="success")
    body = api.get(f"/v1/requests/{request_id}").json()
    assert sorted(e["content"] for e in body["events"]) == ["Likes hiking", "Lives in Paris"]
    results = api.post(
        "/v1/memories/search", {"user_id": str(end_user.id), "query": "Paris"}, format="json"
    ).json()["results"]
    assert results[0]["content"] == "Lives in Paris"


def test_worker_killed_mid_job_is_recovered_and_applied_once(api, end_user, start_worker) -> None:
    with FakeOpenAI(delay_seconds=3, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        env = {
            **model_env(fake),
            "MEMORY_JOB_LEASE_SECONDS": "2",
            "MEMORY_PENDING_GRACE_SECONDS": "1",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
        }
        doomed = start_worker(**env)
        request_id = post_job(api, end_user, "I live in Paris. I work at Acme.")
        wait_for(lambda: status_of(request_id) == "processing", what="processing")
        doomed.kill()  # SIGKILL, main process and pool child: the message is never acked

        fake.delay_seconds = 0
        start_worker(with_beat=True, **env)
        wait_for(lambda: status_of(request_id) == "success", what="success after restart")
    memory_request = MemoryRequest.objects.get(pk=request_id)
    assert memory_request.attempts == 2
    contents = sorted(Memory.objects.filter(user=end_user).values_list("content", flat=True))
    assert contents == ["Lives in Paris", "Works at Acme"]


def test_jobs_survive_a_broker_that_lost_every_message(api, end_user, start_worker) -> None:
    request_ids = [post_job(api, end_user, f"I have {n} cats.") for n in ("two", "three")]
    request_ids.append(post_job(api, end_user, "I live in Oslo."))
    redis.Redis.from_url(settings.REDIS_URL).flushdb()  # Redis restarted empty

    start_worker(
        with_beat=True, MEMORY_PENDING_GRACE_SECONDS="1", MEMORY_SWEEP_INTERVAL_SECONDS="0.5"
    )
    for request_id in request_ids:
        wait_for(lambda rid=request_id: status_of(rid) == "success", what=f"{request_id} success")
    assert Memory.objects.filter(user=end_user, content="Lives in Oslo").count() == 1


def _sessions_opened() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_worker_keeps_its_database_connections_across_jobs(api, end_user, start_worker) -> None:
    start_worker(queues="default")
    warm_up = post_job(api, end_user, "I like tea.")
    wait_for(lambda: status_of(warm_up) == "success", what="first job")
    time.sleep(1.5)  # PostgreSQL publishes its session counts about once a second
    before = _sessions_opened()
    request_ids = [post_job(api, end_user, f"I like sport{n}.") for n in range(20)]
    for request_id in request_ids:
        wait_for(lambda rid=request_id: status_of(rid) == "success", what=f"{request_id}")
    time.sleep(1.5)
    # Celery's Django fixup used to close the pool after every task: two new sessions a job.
    assert _sessions_opened() - before <= 4


def test_long_job_keeps_its_lease_so_a_second_delivery_does_nothing(
    api, end_user, start_worker
) -> None:
    with FakeOpenAI(delay_seconds=2, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        # Two LLM calls of 2 s each outlive a 1 s lease many times over: only renewal keeps it.
        start_worker(concurrency=2, MEMORY_JOB_LEASE_SECONDS="1", **model_env(fake))
        request_id = post_job(api, end_user, "I live in Paris.")
        wait_for(lambda: status_of(request_id) == "processing", what="processing")
        time.sleep(1.5)
        process_memory_request.apply_async(args=[request_id], queue="default")  # a duplicate
        wait_for(lambda: status_of(request_id) == "success", what="success")
        time.sleep(1)  # let the duplicate run to its end
    memory_request = MemoryRequest.objects.get(pk=request_id)
    assert memory_request.attempts == 1
    assert Memory.objects.filter(user=end_user).count() == 1


def test_job_that_keeps_killing_its_worker_ends_in_failure_and_others_flow(
    api, end_user, start_worker
) -> None:
    with FakeOpenAI(delay_seconds=1.5, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        env = {
            "MEMORY_JOB_LEASE_SECONDS": "1",
            "MEMORY_JOB_MAX_ATTEMPTS": "2",
            "MEMORY_PENDING_GRACE_SECONDS": "1",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
        }
        worker = start_worker(queues="default", **env, **model_env(fake))
        start_worker(queues="high", with_beat=True, **env)  # the sweeper, out of harm's way
        poison_id = post_job(api, end_user, "I live in Paris.")
        for attempt in (1, 2):
            wait_for(
                lambda a=attempt: MemoryRequest.objects.filter(
                    pk=poison_id, status="processing", attempts=a
                ).exists(),
                what=f"attempt {attempt} running",
            )
            for child in psutil.Process(worker.process.pid).children():
                child.kill()  # the pool process dies mid-job, as if the job crashed it
        wait_for(lambda: status_of(poison_id) == "failure", what="poison job failure")
        healthy_id = post_job(api, end_user, "I like tea.")
        wait_for(lambda: status_of(healthy_id) == "success", what="the next job")
    poison = MemoryRequest.objects.get(pk=poison_id)
    assert poison.attempts == 2 and "Gave up after 2 attempts" in poison.error
    assert list(Memory.objects.filter(user=end_user).values_list("content", flat=True)) == [
        "Likes tea"
    ]


def test_poison_messages_are_acknowledged_and_never_come_back(api, end_user, start_worker) -> None:
    from memoryproject.celery import app

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    # What killed workers of earlier tests left unacknowledged would come back during this one.
    broker.delete("default", "unacked", "unacked_index")
    worker = start_worker(queues="default")
    unknown_request = "00000000-0000-0000-0000-000000000000"
    with app.connection_for_write() as connection_, connection_.Producer() as producer:
        # Not a message at all: Redis holds a string that is not kombu's JSON envelope.
        for garbage in ("garbage{", "[1, 2]", '{"body": "x"}'):
            connection_.default_channel.client.lpush("default", garbage)
        # A message whose body does not decode as its content type says.
        producer.publish(
            "{not json",
            routing_key="default",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "tasks.memory_jobs.process_memory_request", "id": "poison-1"},
        )
        # A task message without its id: Celery's consumer fails on it (a KeyError).
        producer.publish(
            [["x"], {}, {}],
            routing_key="default",
            serializer="json",
            headers={"task": "tasks.memory_jobs.process_memory_request", "poison": "3"},
        )
        # A task no worker knows.
        producer.publish(
            [[], {}, {}],
            routing_key="default",
            serializer="json",
            headers={"task": "tasks.no_such_task", "id": "poison-2"},
        )
    process_memory_request.apply_async(args=[unknown_request], queue="default")
    process_memory_request.apply_async(args=["not-a-uuid"], queue="default")

    request_id = post_job(api, end_user, "I live in Paris.")
    wait_for(lambda: status_of(request_id) == "success", what="the job after the poison")
    assert worker.process.poll() is None, worker.output()[-3000:]
    wait_for(lambda: broker.llen("default") == 0 and broker.hlen("unacked") == 0, timeout=10)
    expected = ("poison-1", "poison-2", "no_such_task", "not-a-uuid", unknown_request)

    def all_logged() -> bool:  # the pool child's lines may reach the log a moment later
        log = worker.output()
        return all(recorded in log for recorded in expected)

    wait_for(all_logged, timeout=10, what="a log line for each poison message")
    log = worker.output()
    assert log.count("not a message") == 3
    assert log.count("dropped a message its consumer failed on") == 1
