"""The memory pipeline in-process: extraction, decisions, id mapping, retries, fencing."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import redis.connection
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from memories import accounts, ledger, memory_writes, pipeline
from memories.models import EndUser, Memory, MemoryHistory, MemoryRequest, OutboxEvent
from memories.pipeline import memory_request_run
from memories.providers.openai_provider import DECIDE_PROMPT, EXTRACT_PROMPT
from memories.providers.wiring import get_embedder
from tests.fake_openai import FakeResponse, rule_based_chat
from tests.helpers import store_memories, submit_job
from tests.workers import database_url_for


def run(user: EndUser, *texts: str) -> MemoryRequest:
    memory_request = submit_job(user, *texts)
    assert memory_request_run(request_id=str(memory_request.id)) == "done"
    memory_request.refresh_from_db()
    assert memory_request.status == "success"
    return memory_request


def live_contents(user: EndUser) -> list[str]:
    return sorted(
        Memory.objects.filter(
            user=user, deleted_at__isnull=True, valid_to__isnull=True
        ).values_list("content", flat=True)
    )


# --- The offline pipeline ------------------------------------------------------------------------

pytestmark_db = pytest.mark.django_db


@pytestmark_db
def test_first_person_statement_adds_a_memory(end_user) -> None:
    request = run(end_user, "I live in Paris.")
    assert [e["event"] for e in request.result] == ["ADD"]
    assert live_contents(end_user) == ["Lives in Paris"]
    memory = Memory.objects.get(user=end_user)
    assert list(memory.history.values_list("event", "new_content")) == [("ADD", "Lives in Paris")]


@pytestmark_db
def test_moving_city_updates_the_home_memory(end_user) -> None:
    run(end_user, "I live in Paris.")
    paris = Memory.objects.get(user=end_user)
    request = run(end_user, "I moved to Berlin.")
    assert request.result == [
        {
            "event": "UPDATE",
            "memory_id": str(paris.id),
            "content": "Lives in Berlin",
            "previous_content": "Lives in Paris",
            "occurred_at": request.created_at.isoformat(),
        }
    ]
    paris.refresh_from_db()
    assert paris.content == "Lives in Berlin" and paris.version == 2
    assert live_contents(end_user) == ["Lives in Berlin"]


@pytestmark_db
def test_no_longer_statement_closes_the_memory_with_the_reason_in_its_history(end_user) -> None:
    run(end_user, "I eat meat. I like hiking.")
    request = run(end_user, "I no longer eat meat.")
    assert [e["event"] for e in request.result] == ["DELETE"]
    assert live_contents(end_user) == ["Likes hiking"]
    closed = Memory.objects.get(user=end_user, content="Eats meat")
    assert closed.deleted_at is None and closed.valid_to == request.created_at
    last = closed.history.last()
    assert (last.event, last.old_content, last.reason) == (
        "CLOSE",
        "Eats meat",
        "No longer eats meat",
    )


@pytestmark_db
def test_repeating_a_fact_changes_nothing(end_user) -> None:
    run(end_user, "I live in Paris.")
    request = run(end_user, "I live in Paris!")
    assert request.result == []
    assert live_contents(end_user) == ["Lives in Paris"]
    assert MemoryHistory.objects.count() == 1


@pytestmark_db
def test_chit_chat_yields_no_memories(end_user) -> None:
    request = run(end_user, "Hello there! What is the weather like?")
    assert request.result == [] and live_contents(end_user) == []


@pytestmark_db
def test_infer_false_stores_messages_verbatim(end_user) -> None:
    memory_request = submit_job(end_user, "Remember the code 4711", infer=False)
    assert memory_request_run(request_id=str(memory_request.id)) == "done"
    assert live_contents(end_user) == ["Remember the code 4711"]


@pytestmark_db
def test_a_job_stores_awkward_text_and_metadata_exactly(end_user) -> None:
    # A job's rows travel to PostgreSQL as one JSON document (memories.rows): quotes,
    # backslashes, non-ASCII text and an integer beyond 64 bits must come back as they went in.
    text = 'Remember "C:\\temp\\new" — naïve 北京 {"not": json} \' ; -- $1'
    metadata = {"big": 2**70, "quote": 'say "hi"', "nested": {"list": [1.5, None, True]}}
    memory_request = submit_job(
        end_user, text, infer=False, metadata=metadata, agent_id='agent "7"'
    )
    assert memory_request_run(request_id=str(memory_request.id)) == "done"

    memory = Memory.objects.get(user=end_user)
    assert (memory.content, memory.metadata, memory.agent_id) == (text, metadata, 'agent "7"')
    assert memory.version == 1 and memory.scope == "user" and memory.deleted_at is None
    expected = get_embedder().embed([text])[0]
    assert memory.embedding == pytest.approx(expected, rel=1e-6, abs=1e-7)
    history = memory.history.get()
    assert (history.event, history.old_content, history.new_content) == ("ADD", None, text)
    assert (history.actor, history.request_id) == ('agent "7"', memory_request.id)
    event = OutboxEvent.objects.get(event_type="memory.created")
    assert event.payload["memory"]["content"] == text
    assert event.payload["memory"]["metadata"] == metadata


@pytestmark_db
def test_memories_of_other_users_are_never_touched(tenant, end_user) -> None:
    bob = accounts.end_user_create(tenant=tenant, external_id="bob")
    run(bob, "I live in Paris.")
    run(end_user, "I moved to Berlin.")
    assert live_contents(bob) == ["Lives in Paris"]
    assert live_contents(end_user) == ["Lives in Berlin"]


# --- Exactly once --------------------------------------------------------------------------------


@pytestmark_db
def test_duplicate_task_delivery_changes_nothing(end_user) -> None:
    request = run(end_user, "I live in Paris.")
    assert memory_request_run(request_id=str(request.id)) == "skipped"
    assert Memory.objects.filter(user=end_user).count() == 1


@pytestmark_db
def test_second_delivery_while_lease_is_live_does_nothing(end_user) -> None:
    request = submit_job(end_user, "I live in Paris.")
    claim = ledger.memory_request_claim(request_id=str(request.id))
    assert claim is not None
    assert ledger.memory_request_claim(request_id=str(request.id)) is None
    assert memory_request_run(request_id=str(request.id)) == "skipped"
    request.refresh_from_db()
    assert request.status == "processing" and request.attempts == 1


@pytestmark_db
def test_only_the_latest_claim_holder_commits(end_user) -> None:
    request = submit_job(end_user, "I live in Paris.")
    first = ledger.memory_request_claim(request_id=str(request.id))
    MemoryRequest.objects.filter(pk=request.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    second = ledger.memory_request_claim(request_id=str(request.id))
    assert second is not None and second.token == first.token + 1
    vector = get_embedder().embed(["Lives in Paris"])[0]
    change = memory_writes.PlannedChange("ADD", None, "Lives in Paris", vector)
    pipeline.memory_request_complete(claim=second, changes=[change])
    with pytest.raises(ledger.LeaseLost):
        pipeline.memory_request_complete(claim=first, changes=[change])
    assert live_contents(end_user) == ["Lives in Paris"]


@pytestmark_db
def test_poison_job_fails_after_max_attempts(settings, end_user) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 3
    request = submit_job(end_user, "I live in Paris.")
    for _ in range(3):  # each claim's worker "dies": the lease just runs out
        assert ledger.memory_request_claim(request_id=str(request.id)) is not None
        MemoryRequest.objects.filter(pk=request.pk).update(
            lease_until=timezone.now() - timedelta(seconds=1)
        )
    assert ledger.memory_request_claim(request_id=str(request.id)) is None
    request.refresh_from_db()
    assert request.status == "failure" and "Gave up after 3 attempts" in request.error
    assert not Memory.objects.exists()


@pytestmark_db
def test_unknown_request_is_dropped_without_error(db) -> None:
    assert memory_request_run(request_id="00000000-0000-0000-0000-000000000000") == "skipped"


@pytest.mark.django_db(transaction=True)
def test_concurrent_identical_posts_create_one_request(api: APIClient, end_user) -> None:
    body = {"user_id": str(end_user.id), "messages": [{"role": "user", "content": "I like tea."}]}
    barrier = threading.Barrier(6)
    statuses: list[int] = []

    def post() -> None:
        try:
            barrier.wait()
            statuses.append(api.post("/v1/memories", body, format="json").status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [202] + [409] * 5
    assert MemoryRequest.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_killed_database_connection_rolls_back_and_the_retry_applies_once(end_user) -> None:
    request = submit_job(end_user, "I live in Paris. I like hiking. I work at Acme.")
    inserts = {"count": 0}

    def kill_connection_on_second_insert(execute, sql, params, many, context):
        # The job's first INSERT (its memories) has run inside the transaction; the connection
        # dies as the second one (their history) is sent. (The job's connection, whichever of
        # the pool's it took for its commit: it gives its connection back during model calls.)
        if sql.lstrip().upper().startswith("INSERT"):
            inserts["count"] += 1
            if inserts["count"] == 2:
                pid = context["connection"].connection.info.backend_pid
                with psycopg.connect(
                    database_url_for(connection.settings_dict), autocommit=True
                ) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(kill_connection_on_second_insert):
        assert memory_request_run(request_id=str(request.id)) == "retry"
    assert inserts["count"] == 2
    request.refresh_from_db()
    assert request.status == "pending" and "OperationalError" in request.error
    assert not Memory.objects.exists()  # the first insert was rolled back with the rest
    assert memory_request_run(request_id=str(request.id)) == "done"
    assert live_contents(end_user) == ["Likes hiking", "Lives in Paris", "Works at Acme"]


# --- The LLM path through the real openai client -------------------------------------------------


def _decide_bodies(fake) -> list[dict]:
    return [
        json.loads(r.body["messages"][-1]["content"])
        for r in fake.requests
        if r.path.endswith("/chat/completions")
        and r.body["messages"][0]["content"] == DECIDE_PROMPT
    ]


@pytestmark_db
def test_llm_sees_integer_ids_never_uuids(openai_settings, end_user) -> None:
    memories = store_memories(end_user, "Lives in Paris", "Likes hiking")
    run(end_user, "I moved to Berlin.")
    sent = _decide_bodies(openai_settings)
    assert len(sent) == 1
    assert sorted(m["id"] for m in sent[0]["memories"]) == [1, 2]
    raw = json.dumps(sent[0])
    assert all(str(m.id) not in raw for m in memories)


@pytestmark_db
def test_llm_update_and_delete_land_on_the_right_uuid(openai_settings, end_user) -> None:
    paris, hiking, meat = store_memories(end_user, "Lives in Paris", "Likes hiking", "Eats meat")

    def chat(body: dict) -> str | FakeResponse:
        if body["messages"][0]["content"] == EXTRACT_PROMPT:
            return json.dumps({"facts": ["Lives in Rome", "No longer eats meat"]})
        shown = {
            m["text"]: m["id"] for m in json.loads(body["messages"][-1]["content"])["memories"]
        }
        return json.dumps(
            {
                "memory": [
                    {"event": "UPDATE", "id": shown["Lives in Paris"], "text": "Lives in Rome"},
                    {"event": "DELETE", "id": str(shown["Eats meat"])},
                ]
            }
        )

    openai_settings.chat_handler = chat
    run(end_user, "I moved to Rome and I no longer eat meat.")
    for memory in (paris, hiking, meat):
        memory.refresh_from_db()
    assert paris.content == "Lives in Rome" and paris.deleted_at is None
    assert meat.valid_to is not None and meat.deleted_at is None
    assert hiking.content == "Likes hiking" and hiking.version == 1


@pytestmark_db
def test_hallucinated_memory_id_changes_nothing(openai_settings, end_user) -> None:
    (paris,) = store_memories(end_user, "Lives in Paris")

    def chat(body: dict) -> str:
        if body["messages"][0]["content"] == EXTRACT_PROMPT:
            return json.dumps({"facts": ["Lives in Rome"]})
        return json.dumps(
            {
                "memory": [
                    {"event": "UPDATE", "id": 99, "text": "Lives in Rome"},
                    {"event": "DELETE", "id": 42},
                ]
            }
        )

    openai_settings.chat_handler = chat
    request = run(end_user, "I moved to Rome.")
    assert request.result == []
    paris.refresh_from_db()
    assert paris.content == "Lives in Paris" and paris.deleted_at is None and paris.version == 1


@pytestmark_db
def test_all_facts_are_embedded_in_one_call(openai_settings, end_user) -> None:
    run(end_user, "I live in Paris. I like hiking. I work at Acme. I have a cat.")
    embedding_calls = [r for r in openai_settings.requests if r.path.endswith("/embeddings")]
    assert len(embedding_calls) == 1
    assert len(embedding_calls[0].body["input"]) == 4
    assert len(live_contents(end_user)) == 4


@pytestmark_db
def test_invalid_json_ends_in_failure_after_the_retries(
    settings, openai_settings, end_user
) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 3
    openai_settings.chat_handler = lambda body: "Sure! Here are the facts: Lives in Paris"
    request = submit_job(end_user, "I live in Paris.")
    outcomes = [memory_request_run(request_id=str(request.id)) for _ in range(3)]
    assert outcomes == ["retry", "retry", "failed"]
    request.refresh_from_db()
    assert request.status == "failure" and request.attempts == 3
    assert "JSON" in request.error and "3 attempts" in request.error
    assert not Memory.objects.exists()


@pytestmark_db
def test_provider_outage_is_retried_then_succeeds(openai_settings, end_user) -> None:
    openai_settings.fail_next(1, status=503)
    request = submit_job(end_user, "I live in Paris.")
    assert memory_request_run(request_id=str(request.id)) == "retry"
    assert memory_request_run(request_id=str(request.id)) == "done"
    assert live_contents(end_user) == ["Lives in Paris"]


def test_rule_based_chat_is_the_default_fake_model() -> None:
    # The fake server's default answers must stay the offline model's, or the tests above
    # would silently test a different decider.
    answer = rule_based_chat(
        {
            "messages": [
                {"role": "system", "content": EXTRACT_PROMPT},
                {
                    "role": "user",
                    "content": json.dumps(
                        {"conversation": [{"role": "user", "content": "I live in Oslo."}]}
                    ),
                },
            ]
        }
    )
    assert json.loads(answer) == {"facts": ["Lives in Oslo"]}


@pytestmark_db
@pytest.mark.parametrize("garbage", ["not-a-uuid", "", "1; DROP TABLE x"])
def test_unparseable_request_id_is_dropped_not_retried(garbage) -> None:
    assert memory_request_run(request_id=garbage) == "skipped"


@pytestmark_db
def test_jobs_run_through_the_batching_embedder_when_a_window_is_set(settings, end_user) -> None:
    from memories.providers.batching import BatchingEmbedder
    from memories.providers.wiring import get_embedder

    settings.EMBEDDING_BATCH_WINDOW_MS = 5
    get_embedder.cache_clear()
    assert isinstance(get_embedder(), BatchingEmbedder)
    run(end_user, "I live in Paris.")
    assert live_contents(end_user) == ["Lives in Paris"]


@pytest.mark.django_db(transaction=True)
def test_jobs_running_at_once_in_a_threads_worker_share_one_embedding_call(
    end_user, start_worker
) -> None:
    from django.conf import settings

    from tests.fake_openai import FakeOpenAI
    from tests.helpers import model_env, wait_for

    with FakeOpenAI(delay_seconds=0.3, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        start_worker(
            queues="default",
            concurrency=4,
            pool="threads",
            EMBEDDING_BATCH_WINDOW_MS="400",
            **model_env(fake),
        )
        hobbies = ["chess", "golf", "tennis", "rowing"]
        # Four users: one user's jobs run one after another (tests/test_job_order.py).
        users = [end_user] + [
            accounts.end_user_create(tenant=end_user.tenant, external_id=h) for h in hobbies[1:]
        ]
        with transaction.atomic():  # their four tasks are sent together, on commit
            ids = [
                submit_job(user, f"I like {hobby}.").id
                for user, hobby in zip(users, hobbies, strict=True)
            ]
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="success").count() == 4,
            what="the four jobs",
        )
        embedding_calls = [r.body["input"] for r in fake.requests if r.path.endswith("/embeddings")]
    # The four jobs reached their embedding step together (their first model calls ran side by
    # side), so the window gathered their facts into fewer calls than jobs.
    assert len(embedding_calls) < 4, embedding_calls
    assert sorted(text for call in embedding_calls for text in call) == sorted(
        f"Likes {hobby}" for hobby in hobbies
    )
    assert [live_contents(user) for user in users] == [[f"Likes {hobby}"] for hobby in hobbies]


@pytest.mark.django_db(transaction=True)
def test_database_error_while_claiming_is_retried_without_spending_an_attempt(end_user) -> None:
    request = submit_job(end_user, "I live in Paris.")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    with psycopg.connect(database_url_for(connection.settings_dict), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert memory_request_run(request_id=str(request.id)) == "retry"
    request.refresh_from_db()
    assert request.status == "pending" and request.attempts == 0
    assert memory_request_run(request_id=str(request.id)) == "done"
    assert live_contents(end_user) == ["Lives in Paris"]


# --- What a job costs the database and Redis --------------------------------------------------


class RedisCommands:
    """Every command (or pipeline) this process sends to Redis, one per round trip."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[bytes] = []
        send = redis.connection.AbstractConnection.send_packed_command

        def recorded(connection: Any, command: Any, check_health: bool = True) -> None:
            parts = [command] if isinstance(command, bytes | str) else list(command)
            self.sent.append(
                b"".join(bytes(p, "utf-8") if isinstance(p, str) else p for p in parts)
            )
            send(connection, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", recorded)

    def names(self) -> list[str]:
        return [sent.split(b"\r\n")[2].decode() for sent in self.sent]


@pytest.mark.django_db(transaction=True)  # committed for real: the after-commit work is counted
def test_a_memory_job_is_ten_statements_and_three_redis_round_trips(end_user, monkeypatch):
    store_memories(end_user, "Lives in Paris", "Likes tea")
    memory_request = submit_job(end_user, "I moved to Berlin.")
    waiting = submit_job(end_user, "I like jam.")  # rung by the first when it ends
    redis_commands = RedisCommands(monkeypatch)
    with CaptureQueriesContext(connection) as queries:
        assert memory_request_run(request_id=str(memory_request.id)) == "done"
    statements = [q["sql"] for q in queries.captured_queries]
    # The fair pick; the user's lock, the claim and the named row's state (one round trip); the
    # nearest memories; then one transaction: the lock of the memory to change, its update, its
    # history, its event, and `success` with the user's next job marked as rung (one round trip).
    assert len(statements) == 10, "\n".join(s[:120] for s in statements)
    assert statements[3] == "BEGIN" and statements[-1] == "COMMIT"
    # After the commit: the event to the stream, the announcement to waiting callers, and the
    # user's next job's doorbell.
    assert redis_commands.names() == ["EVALSHA", "PUBLISH", "LPUSH"]
    waiting.refresh_from_db()
    assert waiting.status == "pending" and waiting.sent_at > memory_request.sent_at


@pytest.mark.django_db(transaction=True)
def test_a_doorbell_for_a_job_whose_user_is_busy_costs_two_statements(end_user, monkeypatch):
    first = submit_job(end_user, "I live in Paris.")
    later = submit_job(end_user, "I like tea.")
    assert ledger.memory_request_claim(request_id=str(first.id)) is not None
    redis_commands = RedisCommands(monkeypatch)
    with CaptureQueriesContext(connection) as queries:
        assert memory_request_run(request_id=str(later.id)) == "skipped"
    assert len(queries.captured_queries) == 2, queries.captured_queries
    assert redis_commands.names() == []
