"""The sweeper rings again only what is known lost: a doorbell never handed to the broker, or one
gone from its lane (which holds later messages, or none) that no worker holds. A backlog, however
old, is left to drain: ringing it again would only add duplicates to the lanes backpressure
measures. Real Redis broker, real ledger."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from kombu.exceptions import OperationalError

from memories import accounts, dispatch, ledger
from memories.events.stream import redis_client
from memories.models import EndUser, MemoryRequest, Tenant
from memoryproject.celery import SENT_AT_HEADER, app
from tasks.memory_jobs import process_memory_request
from tasks.sweeper import sweep_memory_requests
from tests.fake_openai import FakeOpenAI
from tests.helpers import model_env, submit_job, wait_for

pytestmark = pytest.mark.django_db(transaction=True)  # doorbells are sent on commit

TEN_MINUTES = 600


@pytest.fixture(autouse=True)
def _empty_broker() -> None:
    # Messages and holds that earlier tests left.
    redis_client().delete("default", "high", "batch", "unacked", "unacked_index")


def users(tenant: Tenant, count: int, prefix: str = "u") -> list[EndUser]:
    # One job per user: a user's own jobs run one at a time (tests/test_job_order.py).
    return [
        accounts.end_user_create(tenant=tenant, external_id=f"{prefix}{n}") for n in range(count)
    ]


def jobs_for(people: list[EndUser]) -> list[MemoryRequest]:
    return [submit_job(person, f"I like hobby {n}.") for n, person in enumerate(people)]


def queued(lane: str = "default") -> list[str]:
    """The request ids whose doorbells wait in the lane, oldest first."""
    raw = redis_client().lrange(lane, 0, -1)
    return [json.loads(entry)["headers"]["id"] for entry in reversed(raw)]


def age(requests: list[MemoryRequest], seconds: float) -> None:
    """Move the requests `seconds` into the past: accepted, last changed and rung then."""
    ago = timedelta(seconds=seconds)
    MemoryRequest.objects.filter(pk__in=[r.pk for r in requests]).update(
        created_at=F("created_at") - ago,
        updated_at=F("updated_at") - ago,
        sent_at=F("sent_at") - ago,
    )


def age_lane(seconds: float, lane: str = "default") -> None:
    """Move the stamps of the messages queued in the lane `seconds` into the past (as if they
    had waited that long), keeping their order."""
    client = redis_client()
    entries = []
    for raw in client.lrange(lane, 0, -1):
        message = json.loads(raw)
        message["headers"][SENT_AT_HEADER] -= seconds
        entries.append(json.dumps(message))
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(lane)
        if entries:
            pipe.rpush(lane, *entries)
        pipe.execute()


def lose(request: MemoryRequest, lane: str = "default") -> None:
    """Take the request's doorbell out of the lane, as a broker that lost it."""
    client = redis_client()
    for raw in client.lrange(lane, 0, -1):
        if json.loads(raw)["headers"]["id"] == str(request.id):
            client.lrem(lane, 1, raw)


def fresh(request: MemoryRequest) -> MemoryRequest:
    return MemoryRequest.objects.get(pk=request.pk)


def test_a_ten_minute_backlog_is_not_resent(tenant) -> None:
    backlog = jobs_for(users(tenant, 5))
    high = ledger.memory_request_submit(
        tenant_id=tenant.id,
        user_id=users(tenant, 1, prefix="h")[0].id,
        payload={"messages": [{"role": "user", "content": "I live in Oslo."}]},
        priority="high",
    )
    age([*backlog, high], TEN_MINUTES)
    age_lane(TEN_MINUTES)
    age_lane(TEN_MINUTES, lane="high")
    before = queued()

    assert sweep_memory_requests() == 0
    assert queued() == before == [str(r.id) for r in backlog]  # nothing rung twice
    assert queued("high") == [str(high.id)]


def test_a_request_the_broker_refused_is_resent_even_behind_a_backlog(tenant, monkeypatch) -> None:
    backlog = jobs_for(users(tenant, 3))
    age(backlog, TEN_MINUTES)
    age_lane(TEN_MINUTES)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to the broker. Connection refused.")

    with monkeypatch.context() as broker_down:
        broker_down.setattr(dispatch, "_send", refused)
        never_sent = submit_job(users(tenant, 1, prefix="x")[0], "I live in Rome.")
    assert fresh(never_sent).sent_at is None  # the hand-over was taken back
    assert sweep_memory_requests() == 0  # within the grace period: the sender may be at it still

    age([never_sent], settings.MEMORY_PENDING_GRACE_SECONDS + 1)
    assert sweep_memory_requests() == 1
    assert queued() == [*(str(r.id) for r in backlog), str(never_sent.id)]
    assert fresh(never_sent).sent_at is not None


def test_a_message_gone_from_a_lane_that_holds_later_ones_is_resent(tenant) -> None:
    vanished = submit_job(users(tenant, 1, prefix="v")[0], "I live in Lima.")
    backlog = jobs_for(users(tenant, 3))
    lose(vanished)
    age([vanished], TEN_MINUTES)
    # Sent five minutes ago and still queued: these wait their turn behind nothing lost.
    age(backlog, TEN_MINUTES / 2)
    age_lane(TEN_MINUTES / 2)

    assert sweep_memory_requests() == 1
    assert queued() == [*(str(r.id) for r in backlog), str(vanished.id)]


def test_a_stale_request_in_an_empty_lane_is_resent_unless_a_live_worker_holds_it(
    tenant,
) -> None:
    held, lost = jobs_for(users(tenant, 2))
    with app.connection_for_read() as connection:
        # A worker fetches the older doorbell, as Celery does (it waits in the unacked index);
        # the other one is lost, and the lane is empty.
        message = connection.default_channel.basic_get(queue="default", no_ack=False)
        assert message.headers["id"] == str(held.id)
        redis_client().delete("default")
        age([held, lost], 60)

        assert sweep_memory_requests() == 1
        assert queued() == [str(lost.id)]

        # The worker died holding it: a hold older than the grace period runs nothing (kombu
        # would hand the message on only after its visibility timeout).
        client = redis_client()
        for tag, _ in client.zrange("unacked_index", 0, -1, withscores=True):
            client.zadd("unacked_index", {tag: time.time() - 60})
        assert sweep_memory_requests() == 1
        assert queued() == [str(lost.id), str(held.id)]
        message.ack()


def test_a_job_waiting_its_users_turn_is_not_resent_and_is_rung_when_the_turn_comes(
    end_user,
) -> None:
    first = submit_job(end_user, "I live in Paris.")
    second = submit_job(end_user, "I like tea.")
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None and claim.request_id == str(first.id)
    redis_client().delete("default")  # the second's doorbell came and was dropped: not its turn
    age([second], TEN_MINUTES)

    assert sweep_memory_requests() == 0
    assert queued() == []

    with transaction.atomic():
        ledger.memory_request_mark_success(claim=claim, result=[])
    assert queued() == [str(second.id)]  # the finished job rang it...
    rung_at = fresh(second).sent_at
    assert rung_at is not None and timezone.now() - rung_at < timedelta(seconds=5)  # ...recorded
    later = timezone.now() + timedelta(seconds=TEN_MINUTES)
    assert ledger.memory_requests_resend(now=later) == 0  # and its ring waits in the lane


def test_a_resent_request_is_not_resent_again_while_its_new_doorbell_waits(tenant) -> None:
    (lost,) = jobs_for(users(tenant, 1))
    redis_client().delete("default")
    age([lost], 60)
    assert sweep_memory_requests() == 1
    later = timezone.now() + timedelta(seconds=TEN_MINUTES)
    assert ledger.memory_requests_resend(now=later) == 0
    assert queued() == [str(lost.id)]


def test_a_retry_waiting_out_its_countdown_in_a_worker_is_not_resent(tenant) -> None:
    (retrying,) = jobs_for(users(tenant, 1))
    claim = ledger.memory_request_claim(request_id=str(retrying.id))
    assert claim is not None
    assert ledger.memory_request_record_error(claim=claim, error="ProviderError: down") is True
    redis_client().delete("default")
    # The task's retry, as Celery sends it, fetched by a worker that holds it until its countdown
    # ends.
    process_memory_request.apply_async(
        args=[str(retrying.id)], task_id=str(retrying.id), queue="default", countdown=120
    )
    with app.connection_for_read() as connection:
        message = connection.default_channel.basic_get(queue="default", no_ack=False)
        assert message is not None
        later = timezone.now() + timedelta(seconds=settings.MEMORY_PENDING_GRACE_SECONDS + 5)
        assert ledger.memory_requests_due_for_resend(now=later) == []
        much_later = later + timedelta(seconds=120)  # past its countdown: the worker is gone
        due = ledger.memory_requests_due_for_resend(now=much_later)
        assert [str(r.id) for r in due] == [str(retrying.id)]
        message.ack()


def test_a_lease_that_ran_out_is_rung_once_and_again_only_when_that_ring_is_lost(tenant) -> None:
    (stuck,) = jobs_for(users(tenant, 1))
    assert ledger.memory_request_claim(request_id=str(stuck.id)) is not None
    redis_client().delete("default")  # its worker took the doorbell and died
    age([stuck], 2 * TEN_MINUTES)
    lapsed = timezone.now() - timedelta(seconds=TEN_MINUTES)
    MemoryRequest.objects.filter(pk=stuck.pk).update(lease_until=lapsed)
    assert sweep_memory_requests() == 1
    assert sweep_memory_requests() == 0  # the ring waits in the lane
    redis_client().delete("default")
    MemoryRequest.objects.filter(pk=stuck.pk).update(sent_at=F("sent_at") - timedelta(minutes=1))
    assert sweep_memory_requests() == 1  # that ring was lost too


def test_a_real_backlog_drains_with_one_delivery_per_job(tenant, start_worker) -> None:
    """End to end: a worker that takes each job 0.6 s, a sweeper every half second with a grace
    period of 1 s, and a backlog of 10 s: every job is delivered once."""
    with FakeOpenAI(delay_seconds=0.3, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        env = {
            **model_env(fake),
            "MEMORY_PENDING_GRACE_SECONDS": "1",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
        }
        worker = start_worker(queues="default", concurrency=1, **env)
        sweeper = start_worker(queues="high", with_beat=True, **env)  # sweeps on time, apart
        backlog = jobs_for(users(tenant, 16))
        ids = [r.pk for r in backlog]
        wait_for(
            lambda: MemoryRequest.objects.filter(pk__in=ids, status="success").count() == 16,
            timeout=90,
            what="the backlog drained",
        )
    received = Counter(
        re.findall(r"process_memory_request\[([0-9a-f-]{36})\] received", worker.output())
    )
    assert set(received) == {str(i) for i in ids}, worker.output()[-3000:]
    assert max(received.values()) == 1, received
    assert queued() == []  # and none waits to be delivered again
    assert "sweep_memory_requests" in sweeper.output()  # the sweeper did run meanwhile


def test_every_ring_records_its_hand_over(tenant, other_tenant) -> None:
    def rung_recently(request: MemoryRequest) -> bool:
        sent_at = fresh(request).sent_at
        return sent_at is not None and timezone.now() - sent_at < timedelta(seconds=5)

    running, named = jobs_for(users(tenant, 2))
    (fairer,) = jobs_for(users(other_tenant, 1))
    age([running, named, fairer], TEN_MINUTES)
    assert ledger.memory_request_claim(request_id=str(running.id)) is not None
    redis_client().delete("default")
    # The fair claim takes the other tenant's job, and rings the named one again.
    claim = ledger.memory_request_claim(request_id=str(named.id))
    assert claim is not None and claim.request_id == str(fairer.id)
    assert rung_recently(named) and queued() == [str(named.id)]

    # A failed attempt goes back to pending: its retry is sent right after.
    assert not rung_recently(fairer)
    assert ledger.memory_request_record_error(claim=claim, error="ProviderError: down") is True
    assert rung_recently(fairer)

    # The admin's retry of a failed request.
    MemoryRequest.objects.filter(pk=running.pk).update(
        status="failure", sent_at=F("sent_at") - timedelta(minutes=1)
    )
    ledger.memory_request_retry(memory_request=fresh(running))
    assert rung_recently(running) and queued()[-1] == str(running.id)
