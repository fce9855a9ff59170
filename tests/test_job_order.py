"""A user's memory jobs take effect one at a time, in the order they were accepted, each deciding
against what the earlier ones left; jobs of different users still run side by side."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memories import accounts, dispatch, jobs, ledger
from memories.events.stream import redis_client
from memories.models import EndUser, Memory, MemoryRequest
from memories.pipeline import memory_request_complete, memory_request_run
from tests.fake_openai import FakeOpenAI, FakeResponse, error_body, rule_based_chat
from tests.helpers import model_env, submit_job, wait_for

CITIES = ("Paris", "Oslo", "Rome", "Lima", "Kyiv", "Atlantis")


@dataclass
class Call:
    """One chat call the fake model answered: which city it was about, and when it ran."""

    city: str
    started: float
    ended: float


class SlowModel:
    """A chat handler that answers like the rule-based model after `seconds`, records when each
    call ran, and fails every call about Atlantis (a job that cannot succeed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str | dict[str, Any] | FakeResponse:
        text = json.dumps((body.get("messages") or [{}])[-1])  # the call's data, not its prompt
        city = next((c for c in CITIES if c in text), "?")
        started = time.monotonic()
        time.sleep(self.seconds)
        answer = (
            FakeResponse(500, error_body("the model is down"))
            if city == "Atlantis"
            else rule_based_chat(body)
        )
        with self._lock:
            self.calls.append(Call(city, started, time.monotonic()))
        return answer

    def interval(self, city: str) -> tuple[float, float]:
        """From the first call about `city` to the end of its last one."""
        mine = [c for c in self.calls if c.city == city]
        assert mine, f"no model call about {city}"
        return min(c.started for c in mine), max(c.ended for c in mine)

    def most_at_once(self) -> int:
        edges = sorted([(c.started, 1) for c in self.calls] + [(c.ended, -1) for c in self.calls])
        running = most = 0
        for _, step in edges:
            running += step
            most = max(most, running)
        return most


def job(user: EndUser, text: str, n: int) -> MemoryRequest:
    # The same words twice are the same job (a 409): the metadata tells them apart.
    return submit_job(user, text, metadata={"n": n})


def done(*requests: MemoryRequest) -> bool:
    ids = [r.pk for r in requests]
    return MemoryRequest.objects.filter(pk__in=ids, status__in=["success", "failure"]).count() == (
        len(ids)
    )


def fresh(request: MemoryRequest) -> MemoryRequest:
    return MemoryRequest.objects.get(pk=request.pk)


def contents(user: EndUser) -> list[str]:
    return sorted(
        Memory.objects.filter(user=user, deleted_at__isnull=True).values_list("content", flat=True)
    )


def adds(request: MemoryRequest) -> list[dict[str, Any]]:
    return [e for e in fresh(request).result if e.get("event") == "ADD"]


@pytest.fixture
def slow_model() -> Any:
    model = SlowModel(seconds=0.3)
    with FakeOpenAI(dimensions=settings.EMBEDDING_DIMENSIONS, chat_handler=model) as fake:
        model.env = model_env(fake)  # type: ignore[attr-defined]
        yield model


@pytest.fixture(autouse=True)
def _empty_lanes() -> None:
    redis_client().delete("default", "high", "batch")  # messages earlier tests left


# --- With real workers ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_jobs_of_one_user_run_in_order_and_the_second_sees_the_first(
    end_user, start_worker, slow_model
) -> None:
    start_worker(queues="default", concurrency=4, pool="threads", **slow_model.env)
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I live in Paris.", 2)
    wait_for(lambda: done(first, second), what="both jobs")

    assert fresh(first).status == fresh(second).status == "success"
    assert contents(end_user) == ["Lives in Paris"]  # one memory, not two ADDs
    assert len(adds(first)) == 1 and adds(second) == []
    assert fresh(first).finished_at < fresh(second).finished_at
    # The second job's model calls began only after the first job's had ended.
    assert slow_model.most_at_once() == 1


@pytest.mark.django_db(transaction=True)
def test_jobs_of_different_users_run_side_by_side(tenant, start_worker, slow_model) -> None:
    start_worker(queues="default", concurrency=4, pool="threads", **slow_model.env)
    cities = CITIES[1:5]
    users = [accounts.end_user_create(tenant=tenant, external_id=city) for city in cities]
    requests = [job(u, f"I live in {city}.", 1) for u, city in zip(users, cities, strict=True)]
    wait_for(lambda: done(*requests), what="the four jobs")

    assert all(fresh(r).status == "success" for r in requests)
    intervals = [slow_model.interval(city) for city in cities]
    # Some moment lies inside every job's model calls: all four ran at once.
    assert max(start for start, _ in intervals) < min(end for _, end in intervals), intervals


@pytest.mark.django_db(transaction=True)
def test_an_earlier_job_that_fails_holds_the_next_only_until_it_fails(
    end_user, start_worker, slow_model
) -> None:
    start_worker(
        queues="default",
        concurrency=4,
        pool="threads",
        MEMORY_JOB_MAX_ATTEMPTS="2",
        **slow_model.env,
    )
    doomed = job(end_user, "I live in Atlantis.", 1)
    after = job(end_user, "I live in Paris.", 2)
    wait_for(lambda: done(doomed, after), what="both jobs")

    assert fresh(doomed).status == "failure" and fresh(doomed).attempts == 2
    assert fresh(after).status == "success" and contents(end_user) == ["Lives in Paris"]
    # Both attempts of the doomed job (and its retry's backoff) came before the next job.
    assert slow_model.interval("Atlantis")[1] <= slow_model.interval("Paris")[0]
    assert fresh(doomed).finished_at < fresh(after).finished_at


@pytest.mark.django_db(transaction=True)
def test_an_earlier_job_whose_message_was_lost_runs_first_when_the_next_one_rings(
    end_user, start_worker, slow_model, monkeypatch
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(dispatch, "request_send", lambda **kwargs: None)  # the broker lost it
        lost = job(end_user, "I live in Paris.", 1)
    start_worker(queues="default", concurrency=4, pool="threads", **slow_model.env)  # no sweeper
    rung = job(end_user, "I live in Paris.", 2)
    wait_for(lambda: done(lost, rung), what="both jobs")

    assert fresh(lost).status == fresh(rung).status == "success"
    assert contents(end_user) == ["Lives in Paris"]
    assert len(adds(lost)) == 1 and adds(rung) == []
    assert fresh(lost).finished_at < fresh(rung).finished_at


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_died_is_reclaimed_before_the_next_one_runs(
    end_user, start_worker, slow_model
) -> None:
    env = {
        **slow_model.env,
        "MEMORY_JOB_LEASE_SECONDS": "1",
        "MEMORY_PENDING_GRACE_SECONDS": "1",
        "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
    }
    doomed_worker = start_worker(queues="default", concurrency=4, pool="threads", **env)
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I live in Paris.", 2)
    wait_for(lambda: fresh(first).status == "processing", what="the first job running")
    doomed_worker.kill()  # its lease runs out; the second job must not run before the first

    start_worker(queues="default,high", concurrency=4, pool="threads", with_beat=True, **env)
    wait_for(lambda: done(first, second), what="both jobs after the restart")
    assert fresh(first).status == fresh(second).status == "success"
    assert fresh(first).attempts == 2 and fresh(second).attempts == 1
    assert contents(end_user) == ["Lives in Paris"]
    assert len(adds(first)) == 1 and adds(second) == []


# --- The claim, in-process -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_later_jobs_doorbell_claims_the_users_oldest_pending_job(end_user) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    claim = ledger.memory_request_claim(request_id=str(second.id))
    assert claim is not None and claim.request_id == str(first.id)
    assert fresh(second).status == "pending"


@pytest.mark.django_db(transaction=True)
def test_a_later_job_waits_while_an_earlier_one_runs_and_is_rung_when_it_ends(
    end_user, tenant, monkeypatch
) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    other = job(accounts.end_user_create(tenant=tenant, external_id="bob"), "I like jam.", 1)
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None

    assert ledger.memory_request_claim(request_id=str(second.id)) is None  # deferred, no sleep
    assert fresh(second).status == "pending" and fresh(second).attempts == 0
    assert ledger.memory_request_claim(request_id=str(other.id)) is not None  # another user

    rung: list[str] = []
    monkeypatch.setattr(dispatch, "request_send", lambda **kw: rung.append(kw["request_id"]))
    assert memory_request_run(request_id=str(first.id)) == "skipped"  # held by the claim above

    memory_request_complete(claim=claim, changes=[])
    assert rung == [str(second.id)]  # the finished job rang the user's next one
    assert memory_request_run(request_id=str(second.id)) == "done"


@pytest.mark.django_db(transaction=True)
def test_a_retrying_earlier_job_keeps_its_backoff_and_its_place(settings, end_user) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None
    assert ledger.memory_request_record_error(claim=claim, error="ProviderError: down") is True
    # The first job waits out its backoff for its own retry; the second still waits for it.
    assert ledger.memory_request_claim(request_id=str(second.id)) is None
    again = ledger.memory_request_claim(request_id=str(first.id))
    assert again is not None and again.token == 2


@pytest.mark.django_db(transaction=True)
def test_an_earlier_job_run_by_a_later_ones_doorbell_is_itself_rung_for_its_retry(
    end_user, monkeypatch
) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    rung: list[dict[str, Any]] = []
    monkeypatch.setattr(dispatch, "request_send", lambda **kwargs: rung.append(kwargs))

    def broken(claim: ledger.Claim, memory_request: MemoryRequest) -> None:
        raise RuntimeError("the model is down")

    assert jobs.request_run(request_id=str(second.id), work=broken) == "retry"
    assert fresh(first).status == "pending" and fresh(first).attempts == 1
    # The failed job is rung after the backoff: the task's own retry names the second job, which
    # is not its turn.
    assert [(r["request_id"], r["countdown"] > 0) for r in rung] == [(str(first.id), True)]


@pytest.mark.django_db(transaction=True)
def test_a_failed_earlier_job_does_not_hold_the_next(settings, end_user) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 1
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None
    assert ledger.memory_request_record_error(claim=claim, error="ProviderError: down") is False
    assert fresh(first).status == "failure"
    assert memory_request_run(request_id=str(second.id)) == "done"


@pytest.mark.django_db(transaction=True)
def test_an_expired_earlier_job_is_reclaimed_by_the_next_ones_doorbell(settings, end_user) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    assert ledger.memory_request_claim(request_id=str(first.id)) is not None
    MemoryRequest.objects.filter(pk=first.pk).update(lease_until=timezone.now())  # worker died
    claim = ledger.memory_request_claim(request_id=str(second.id))
    assert claim is not None and claim.request_id == str(first.id) and claim.token == 2


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_resends_only_the_job_whose_turn_it_is(settings, end_user, tenant) -> None:
    first = job(end_user, "I live in Paris.", 1)
    job(end_user, "I like tea.", 2)  # waits for the first: not rung by the sweeper
    other = job(accounts.end_user_create(tenant=tenant, external_id="bob"), "I like jam.", 1)
    redis_client().delete("default")  # their doorbells were lost (a queued one is never resent)
    later = timezone.now() + timedelta(seconds=settings.MEMORY_PENDING_GRACE_SECONDS + 1)
    due = {str(r.id) for r in ledger.memory_requests_due_for_resend(now=later)}
    assert due == {str(first.id), str(other.id)}


@pytest.mark.django_db(transaction=True)
def test_batches_are_not_ordered_behind_a_users_jobs(end_user, tenant) -> None:
    job(end_user, "I live in Paris.", 1)
    items = [{"user_id": str(end_user.id), "content": "Likes tea"}]
    batch = ledger.batch_request_submit(tenant=tenant, items=items)
    claim = ledger.memory_request_claim(request_id=str(batch.id))
    assert claim is not None and claim.request_id == str(batch.id)


@pytest.mark.django_db(transaction=True)
def test_the_fair_claim_takes_the_quietest_tenants_job_whose_turn_it_is(tenant) -> None:
    def people(name: str, count: int) -> list[EndUser]:
        owner = accounts.tenant_get_or_create(name=name)
        return [accounts.end_user_create(tenant=owner, external_id=f"p{n}") for n in range(count)]

    loud = [job(person, "I live in Paris.", 1) for person in people("loud", 3)]
    for running in loud[:2]:
        assert ledger.memory_request_claim(request_id=str(running.id)) is not None
    # A tenant with one job running and one waiting; a quieter one running none, whose user's
    # oldest job waits out a retry's backoff (attempts 1), so its later job is not its turn.
    busy_running, busy_waiting = (job(p, "I like tea.", 1) for p in people("busy", 2))
    assert ledger.memory_request_claim(request_id=str(busy_running.id)) is not None
    (quiet_user,) = people("quiet", 1)
    backing_off = job(quiet_user, "I like jam.", 1)
    MemoryRequest.objects.filter(pk=backing_off.pk).update(attempts=1)
    job(quiet_user, "I like figs.", 2)

    claim = ledger.memory_request_claim(request_id=str(loud[2].id))
    assert claim is not None and claim.request_id == str(busy_waiting.id)

    # Once the quiet tenant has a job whose turn it is, it goes first (it runs fewest).
    (other_quiet,) = (job(p, "I like rye.", 1) for p in people("quieter", 1))
    claim = ledger.memory_request_claim(request_id=str(loud[2].id))
    assert claim is not None and claim.request_id == str(other_quiet.id)


# --- Doorbells at acceptance ---------------------------------------------------------------------


@pytest.fixture
def rung(monkeypatch) -> list[str]:
    """The ids of the requests whose doorbell was handed to the broker (which took each)."""
    sent: list[str] = []

    def send(**kwargs: Any) -> bool:
        sent.append(kwargs["request_id"])
        return True

    monkeypatch.setattr(dispatch, "request_send", send)
    return sent


@pytest.mark.django_db(transaction=True)
def test_a_job_accepted_while_its_users_job_is_on_its_way_is_rung_only_when_that_one_ends(
    end_user, rung
) -> None:
    first = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)  # its doorbell would find the user's turn taken
    assert rung == [str(first.id)]

    assert memory_request_run(request_id=str(first.id)) == "done"
    assert rung == [str(first.id), str(second.id)]  # the first job's end rang it
    third = job(end_user, "I like jam.", 3)  # the second is on its way now
    assert memory_request_run(request_id=str(second.id)) == "done"
    assert rung == [str(first.id), str(second.id), str(third.id)]
    assert memory_request_run(request_id=str(third.id)) == "done"
    assert {fresh(r).status for r in (first, second, third)} == {"success"}
    assert fresh(first).finished_at < fresh(second).finished_at < fresh(third).finished_at


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_users_earlier_job_is_stuck_is_rung_and_claims_that_one(
    end_user, rung, monkeypatch
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(dispatch, "request_send", lambda **kwargs: False)  # the broker refused
        refused = job(end_user, "I live in Paris.", 1)
    second = job(end_user, "I like tea.", 2)
    assert rung == [str(second.id)]  # not left for the sweeper
    claim = ledger.memory_request_claim(request_id=str(second.id))
    assert claim is not None and claim.request_id == str(refused.id)

    MemoryRequest.objects.filter(pk=refused.pk).update(lease_until=timezone.now())  # worker died
    third = job(end_user, "I like jam.", 3)
    assert rung == [str(second.id), str(third.id)]
    again = ledger.memory_request_claim(request_id=str(third.id))
    assert again is not None and again.request_id == str(refused.id) and again.token == 2


def high_job(user: EndUser, text: str, n: int) -> MemoryRequest:
    payload = {"messages": [{"role": "user", "content": text}], "metadata": {"n": n}}
    return ledger.memory_request_submit(
        tenant_id=user.tenant_id, user_id=user.id, payload=payload, priority="high"
    )


@pytest.mark.django_db(transaction=True)
def test_a_high_job_behind_its_users_queued_normal_job_is_rung_and_runs_that_one_on_its_lane(
    end_user, tenant, rung
) -> None:
    queued = job(end_user, "I live in Paris.", 1)  # behind the default lane's backlog, say
    urgent = high_job(end_user, "I like tea.", 2)
    assert rung == [str(queued.id), str(urgent.id)]
    claim = ledger.memory_request_claim(request_id=str(urgent.id))
    assert claim is not None and claim.request_id == str(queued.id)

    # Behind a queued high job, a normal one waits to be rung by it.
    bob = accounts.end_user_create(tenant=tenant, external_id="bob")
    bobs_high = high_job(bob, "I like jam.", 1)
    job(bob, "I like rye.", 2)
    assert rung == [str(queued.id), str(urgent.id), str(bobs_high.id)]


def _started_thread(work: Any) -> threading.Thread:
    """`work` in a thread of its own, with its own database connection (closed at the end)."""

    def run() -> None:
        try:
            work()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_job_accepted_as_its_users_job_ends_is_rung_when_the_end_commits_first(
    end_user, rung
) -> None:
    first = job(end_user, "I live in Paris.", 1)
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None
    accepted: list[MemoryRequest] = []
    with transaction.atomic():
        memory_request_complete(claim=claim, changes=[])  # holds the user's lock until commit
        thread = _started_thread(lambda: accepted.append(job(end_user, "I like tea.", 2)))
        thread.join(0.5)
        assert thread.is_alive()  # the insert waits for the end, then sees it
    thread.join(10)
    (second,) = accepted
    assert rung == [str(first.id), str(second.id)]  # rung by its own acceptance


@pytest.mark.django_db(transaction=True)
def test_a_job_accepted_as_its_users_job_ends_is_rung_by_the_end_when_the_insert_commits_first(
    end_user, rung
) -> None:
    first = job(end_user, "I live in Paris.", 1)
    claim = ledger.memory_request_claim(request_id=str(first.id))
    assert claim is not None
    ended = threading.Event()

    def end() -> None:
        memory_request_complete(claim=claim, changes=[])
        ended.set()

    with transaction.atomic():  # the insert's transaction, not committed yet
        second = job(end_user, "I like tea.", 2)
        thread = _started_thread(end)
        assert not ended.wait(0.5)  # the end waits for the insert's lock
    thread.join(10)
    assert ended.is_set()
    assert rung == [str(first.id), str(second.id)]  # not by its acceptance: by the first's end
