"""Under load: backpressure and rate limits refuse cleanly, lanes stay apart, nothing is lost."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from prometheus_client import REGISTRY

from memories import accounts, ledger
from memories.events.stream import DEAD_LETTER_KEY, redis_client
from memories.logs import JsonLogFormatter, RequestIdFilter
from memories.models import Memory, MemoryRequest, OutboxEvent
from memories.pipeline import memory_request_run
from tests.fake_openai import FakeOpenAI
from tests.helpers import metric_value, model_env, wait_for


def job(api, user, text: str, **extra):
    body = {"user_id": str(user.id), "messages": [{"role": "user", "content": text}], **extra}
    return api.post("/v1/memories", body, format="json")


def refusals(lane: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "backpressure_refusals_total", {"lane": lane, "reason": reason}
    )
    return value or 0.0


@pytest.mark.django_db(transaction=True)
def test_full_default_lane_refuses_with_429_before_recording(settings, api, end_user) -> None:
    settings.BACKPRESSURE_MAX_DEPTH = 3
    settings.BACKPRESSURE_CACHE_SECONDS = 0
    redis_client().delete("default", "high")  # messages earlier tests left without a worker
    for n in range(3):  # no worker runs: the three jobs wait in the default lane
        assert job(api, end_user, f"I have {n} bikes.").status_code == 202
    before = refusals("default", "overload")

    refused = job(api, end_user, "I like tea.")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0 and refused.json()["error"] == "overloaded"
    assert MemoryRequest.objects.count() == 3  # nothing recorded for the refused one
    assert refusals("default", "overload") == before + 1
    # The high lane keeps its own, larger allowance: a correction still gets in.
    settings.BACKPRESSURE_HIGH_MAX_DEPTH = 100
    assert job(api, end_user, "I like coffee.", priority="high").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_each_lane_is_refused_by_its_own_depth(settings, api, end_user) -> None:
    settings.BACKPRESSURE_MAX_DEPTH = 2
    settings.BACKPRESSURE_CACHE_SECONDS = 0
    redis_client().delete("default", "high", "batch")  # messages earlier tests left
    items = [{"user_id": str(end_user.id), "content": "Likes tea"}]

    def async_batch(n: int):
        body = {"items": [{**items[0], "content": f"Likes tea {n}"}], "async": True}
        return api.post("/v1/memories/batch", body, format="json")

    assert [async_batch(n).status_code for n in range(3)] == [202, 202, 429]
    # The full batch lane does not shut out memory jobs, nor the other way round.
    assert [job(api, end_user, f"I have {n} cats.").status_code for n in range(3)] == [
        202,
        202,
        429,
    ]
    redis_client().delete("batch")
    MemoryRequest.objects.filter(kind="batch").delete()
    assert async_batch(3).status_code == 202


@pytest.mark.django_db(transaction=True)
def test_a_high_job_finishes_while_the_default_lane_is_saturated(api, end_user, start_worker):
    redis_client().delete("default", "high")  # messages earlier tests left without a worker
    # The backlog is another user's: a user's own jobs run in order (tests/test_job_order.py).
    busy = accounts.end_user_create(tenant=end_user.tenant, external_id="busy")
    with FakeOpenAI(delay_seconds=0.4, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        start_worker(queues="default", concurrency=1, **model_env(fake))
        start_worker(queues="high", concurrency=1, **model_env(fake))
        backlog = [job(api, busy, f"I like hobby{n}.").json()["request_id"] for n in range(8)]
        deadline = time.monotonic() + 20
        while not MemoryRequest.objects.filter(pk__in=backlog, status="processing").exists():
            assert time.monotonic() < deadline, "the default worker took no job"
            time.sleep(0.05)

        high = job(api, end_user, "I live in Oslo.", priority="high").json()["request_id"]
        while MemoryRequest.objects.get(pk=high).status != "success":
            assert time.monotonic() < deadline, "the high job did not finish"
            time.sleep(0.05)
        # Each default job takes two model calls of 0.4 s on the one default process: had the
        # high job queued behind them, it would have finished last of nine.
        unfinished = MemoryRequest.objects.filter(pk__in=backlog).exclude(status="success")
        assert unfinished.count() >= 4


@pytest.mark.django_db
def test_tenant_over_its_rate_gets_429_with_limit_headers(settings, api, other_api, end_user):
    settings.RATE_LIMIT_PER_SECOND = 0.5
    settings.RATE_LIMIT_BURST = 2
    refused_before = refusals("api", "rate_limit")
    first = api.get(f"/v1/users/{end_user.id}")
    assert first.status_code == 200 and first["X-RateLimit-Limit"] == "2"
    assert first["X-RateLimit-Remaining"] == "1"
    api.get(f"/v1/users/{end_user.id}")
    limited = api.get(f"/v1/users/{end_user.id}")
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited["Retry-After"]) >= 1 and limited["X-RateLimit-Remaining"] == "0"
    assert int(limited["X-RateLimit-Reset"]) >= 1
    assert refusals("api", "rate_limit") == refused_before + 1
    # Buckets are per tenant: another tenant is not slowed down.
    assert other_api.get(f"/v1/users/{end_user.id}").status_code == 404


@pytest.mark.django_db(transaction=True)  # the job's task is sent on commit
def test_metrics_are_served_in_prometheus_format(settings, api, end_user) -> None:
    settings.BACKPRESSURE_CACHE_SECONDS = 0
    redis_client().delete("default", "high", "batch")  # messages earlier tests left

    def scraped(name: str, **labels: str) -> float:
        response = api.get("/metrics")
        assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
        return metric_value(response.content.decode(), name, **labels) or 0.0

    batches, items = scraped("batch_write_items_count"), scraped("batch_write_items_sum")
    job(api, end_user, "I live in Paris.")
    assert scraped("queue_depth", lane="default") == 1.0
    assert scraped("memory_requests_pending") == 1.0
    uid = str(end_user.id)
    batch = {"items": [{"user_id": uid, "content": "Likes tea"}] * 3}
    assert api.post("/v1/memories/batch", batch, format="json").json()["ok"] == 3
    assert scraped("batch_write_items_count") == batches + 1
    assert scraped("batch_write_items_sum") == items + 3
    settings.BACKPRESSURE_MAX_DEPTH = 1  # one async batch fills the batch lane
    accepted = api.post("/v1/memories/batch", {**batch, "async": True}, format="json")
    assert accepted.status_code == 202
    refused = api.post("/v1/memories/batch", {**batch, "async": True}, format="json")
    assert refused.status_code == 429
    assert scraped("batch_write_items_count") == batches + 2  # the refused one is not counted


@pytest.mark.django_db
def test_metrics_show_the_outbox_backlog_and_the_dead_letters(api) -> None:
    def scraped(name: str) -> float:
        return metric_value(api.get("/metrics").content.decode(), name) or 0.0

    waiting, dead = scraped("event_outbox_unpublished"), scraped("event_dead_letters")
    # An event whose publishing after commit failed two minutes ago, and one a consumer gave up on.
    stale = timezone.now() - timedelta(seconds=120)
    OutboxEvent.objects.create(event_type="memory.created", payload={}, created_at=stale)
    entry = redis_client().xadd(DEAD_LETTER_KEY, {"entry": "0-1", "group": "audit"})
    try:
        assert scraped("event_outbox_unpublished") == waiting + 1
        assert scraped("event_outbox_oldest_unpublished_seconds") >= 120
        assert scraped("event_dead_letters") == dead + 1
    finally:
        redis_client().xdel(DEAD_LETTER_KEY, entry)


@pytest.mark.django_db(transaction=True)
def test_what_workers_count_shows_on_the_web_process_metrics(
    api, end_user, start_worker, tmp_path, monkeypatch
) -> None:
    # As under `make run`: every process writes its metrics into one folder, /metrics sums them.
    start_worker(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    # Two users: the doorbell of a user's later job may run the user's earlier job (see
    # tests/test_job_order.py), which would count that job on the later one's lane.
    other = accounts.end_user_create(tenant=end_user.tenant, external_id="other")
    jobs = [
        job(api, end_user, "I like tea.").json()["request_id"],
        job(api, other, "I live in Oslo.", priority="high").json()["request_id"],
    ]
    items = [{"user_id": str(end_user.id), "content": f"Likes jam {n}"} for n in range(3)]
    accepted = api.post("/v1/memories/batch", {"items": items, "async": True}, format="json")
    jobs.append(accepted.json()["request_id"])
    wait_for(
        lambda: MemoryRequest.objects.filter(pk__in=jobs, status="success").count() == 3,
        what="the three requests to succeed",
    )
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    def scraped(name: str, **labels: str) -> float | None:
        return metric_value(api.get("/metrics").content.decode(), name, **labels)

    for lane in ("default", "high", "batch"):
        assert scraped("memory_jobs_total", lane=lane, outcome="done") == 1.0, lane
    assert scraped("memory_jobs_total", lane="default", outcome="failed") is None

    # Two memory jobs: each waited in its queue, called the LLM twice, embedded its facts once,
    # read their neighbours and wrote its changes. The batch: one embedding call, one write.
    def stage_count(stage: str, kind: str = "memory_job") -> float | None:
        return scraped("memory_job_stage_seconds_count", stage=stage, kind=kind)

    assert stage_count("queue_wait") == 2.0 and stage_count("total") == 2.0
    assert stage_count("llm") == 4.0
    assert stage_count("embedding") == 2.0
    assert stage_count("database") == 4.0
    assert stage_count("queue_wait", "batch") == 1.0 and stage_count("total", "batch") == 1.0
    assert stage_count("embedding", "batch") == 1.0 and stage_count("database", "batch") == 1.0
    # Two memories from the jobs, three from the batch: an event each, published by the worker.
    wait_for(lambda: scraped("events_published_total") == 5.0, what="five events counted")


@pytest.mark.django_db
def test_failed_requests_form_the_dead_letter_list(settings, api, end_user) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 1
    ok = ledger.memory_request_submit(
        tenant_id=end_user.tenant_id,
        user_id=end_user.id,
        payload={"messages": [{"role": "user", "content": "I like tea."}]},
    )
    bad = ledger.memory_request_submit(
        tenant_id=end_user.tenant_id,
        user_id=end_user.id,
        payload={"messages": [{"role": "user", "content": "I like jam."}]},
    )
    memory_request_run(request_id=str(ok.id))
    MemoryRequest.objects.filter(pk=bad.pk).update(attempts=1, error="ProviderError: boom")
    memory_request_run(request_id=str(bad.id))

    dead = api.get("/v1/requests", {"status": "failure"}).json()["results"]
    assert [r["request_id"] for r in dead] == [str(bad.id)]
    assert dead[0]["attempts"] == 1 and "boom" in dead[0]["error"]
    assert api.get("/v1/requests", {"status": "exploded"}).status_code == 400


@pytest.mark.django_db(transaction=True)
def test_every_log_line_of_a_job_is_json_with_its_request_id(api, end_user, start_worker) -> None:
    with FakeOpenAI(dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        fake.fail_next(1)  # the first model call fails: the job logs the error, then retries
        worker = start_worker(**model_env(fake))  # the project's LOGGING, as a deployed worker
        request_id = job(api, end_user, "I like tea.").json()["request_id"]
        wait_for(lambda: MemoryRequest.objects.get(pk=request_id).status == "success")
        wait_for(lambda: "succeeded" in worker.output(), what="Celery's last line of the job")
    mentioning = [line for line in worker.output().splitlines() if request_id in line]
    records = [json.loads(line) for line in mentioning]  # each one a JSON object
    assert {record["request_id"] for record in records} == {request_id}
    messages = " | ".join(record["message"] for record in records)
    for said in ("received", "attempt 1 failed", "retry", "succeeded"):
        assert said in messages, messages
    # Lines that do not name the request carry it too: the model calls made for it.
    loggers = {record["logger"] for record in records}
    assert {"celery.worker.strategy", "celery.app.trace", "memories.jobs"} <= loggers
    assert loggers - {"celery.worker.strategy", "celery.app.trace", "memories.jobs"}, loggers


@pytest.mark.django_db(transaction=True)
def test_a_lease_renewal_logs_under_its_request_id(settings, end_user, monkeypatch) -> None:
    from memories import jobs

    settings.MEMORY_JOB_LEASE_SECONDS = 0.6  # the renewer wakes every 0.2 s
    request = ledger.memory_request_submit(
        tenant_id=end_user.tenant_id,
        user_id=end_user.id,
        payload={"messages": [{"role": "user", "content": "I like tea."}]},
    )
    claim = ledger.memory_request_claim(request_id=str(request.id))

    def broken_renewal(**kwargs):
        raise RuntimeError("database gone")

    monkeypatch.setattr(ledger, "memory_request_renew_lease", broken_renewal)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(RequestIdFilter())
    logging.getLogger("memories.jobs").addHandler(handler)
    renewer = jobs._LeaseRenewer()  # its own thread, sleeping by this test's lease
    try:
        renewer.add(claim)
        wait_for(lambda: "lease renewal" in stream.getvalue(), timeout=5)
    finally:
        renewer.remove(claim)
        logging.getLogger("memories.jobs").removeHandler(handler)
    record = json.loads(stream.getvalue().splitlines()[0])
    assert record["request_id"] == str(request.id) and "failed" in record["message"]


@pytest.mark.django_db(transaction=True)
def test_warm_shutdown_under_load_loses_and_repeats_nothing(api, end_user, start_worker) -> None:
    with FakeOpenAI(delay_seconds=0.3, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        env = {
            **model_env(fake),
            "MEMORY_PENDING_GRACE_SECONDS": "1",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "0.5",
            "MEMORY_JOB_LEASE_SECONDS": "2",
        }
        first = start_worker(concurrency=2, **env)
        hobbies = [f"hobby{n}" for n in range(12)]
        ids = [job(api, end_user, f"I like {hobby}.").json()["request_id"] for hobby in hobbies]
        deadline = time.monotonic() + 30
        while not MemoryRequest.objects.filter(pk__in=ids, status="success").exists():
            assert time.monotonic() < deadline, "no job finished before the shutdown"
            time.sleep(0.05)
        in_flight = set(
            MemoryRequest.objects.filter(pk__in=ids, status="processing").values_list(
                "pk", flat=True
            )
        )
        # SIGTERM to the main process: Celery's warm shutdown. Up to 30 s more than its jobs take:
        # a pool process whose task ends as the shutdown starts waits that long (billiard's
        # _ensure_messages_consumed, 300 x 0.1 s) for the main process to read its result, which
        # it no longer does (seen once in ~100 runs, with a py-spy dump). Its message is then
        # left unacknowledged and redelivered, a no-op on a finished job.
        first.stop(timeout=60)
        assert first.process.returncode == 0, first.output()[-2000:]
        finished_by_the_first = set(
            MemoryRequest.objects.filter(pk__in=ids, status="success").values_list("pk", flat=True)
        )
        # The jobs running at SIGTERM were finished, not cut short: none left half-done.
        assert in_flight <= finished_by_the_first
        assert not MemoryRequest.objects.filter(pk__in=ids, status="processing").exists()
        start_worker(concurrency=2, with_beat=True, **env)
        deadline = time.monotonic() + 60
        while MemoryRequest.objects.filter(pk__in=ids, status="success").count() < len(ids):
            assert time.monotonic() < deadline, "jobs did not all finish after the restart"
            time.sleep(0.2)
    assert len(finished_by_the_first) < len(ids)  # the restart had work left: it was returned
    contents = sorted(Memory.objects.filter(user=end_user).values_list("content", flat=True))
    assert contents == sorted(f"Likes {hobby}" for hobby in hobbies)
    # Each job ran once: the warm shutdown neither interrupted one nor left one to be re-run.
    attempts = MemoryRequest.objects.filter(pk__in=ids).values_list("attempts", flat=True)
    assert set(attempts) == {1}


COUNT_ONE_JOB = """
import os, sys, time
from pathlib import Path
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")
from memories.metrics import JOBS
counter = JOBS.labels(lane="default", outcome="done")
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
counter.inc()
"""


def test_metrics_of_containers_sharing_one_folder_add_up(tmp_path) -> None:
    """As in the compose file: processes of different hosts (here each in its own UTS and pid
    namespace, so both are pid 1; a user namespace lets a user other than root make them) write
    into one folder, and /metrics counts them all."""
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    folder = tmp_path / "metrics"
    folder.mkdir()
    go = tmp_path / "go"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    containers = []
    for host in ("web-1", "worker-1"):
        ready = tmp_path / f"{host}.ready"
        command = f"hostname {host} && exec {sys.executable} -c '{COUNT_ONE_JOB}' {ready} {go}"
        containers.append(
            (
                ready,
                subprocess.Popen(
                    ["unshare", "--map-root-user", "--uts", "--pid", "--fork", "sh", "-c", command],
                    env=env,
                ),
            )
        )
    wait_for(lambda: all(ready.exists() for ready, _ in containers), what="both processes")
    go.touch()  # both hold their files open, then count
    assert [process.wait(timeout=30) for _, process in containers] == [0, 0]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    exposition = generate_latest(registry).decode()
    assert metric_value(exposition, "memory_jobs_total", lane="default", outcome="done") == 2.0


# --- A loud tenant does not starve a quiet one ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_quiet_tenants_jobs_are_accepted_and_done_while_a_loud_one_floods(
    tenant, other_tenant, start_worker
) -> None:
    import threading

    import httpx

    from memories import accounts
    from tests.live_server import uvicorn_live_server

    with FakeOpenAI(delay_seconds=0.3, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        start_worker(queues="default", concurrency=2, **model_env(fake))  # as shipped: 2 processes
        loud_key, quiet_key = (accounts.api_key_create(tenant=t)[1] for t in (tenant, other_tenant))
        loud_user = accounts.end_user_create(tenant=tenant)
        quiet_user = accounts.end_user_create(tenant=other_tenant)
        stop = threading.Event()

        def flood(base: str, thread: int) -> None:
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {loud_key}"}
            ) as http:
                n = 0
                while not stop.is_set():
                    n += 1
                    text = f"I like loud{thread}x{n}."
                    body = {
                        "user_id": str(loud_user.id),
                        "messages": [{"role": "user", "content": text}],
                    }
                    http.post("/v1/memories", json=body, timeout=10)

        with uvicorn_live_server() as base:
            floods = [threading.Thread(target=flood, args=(base, t)) for t in range(8)]
            for each in floods:
                each.start()
            try:
                wait_for(
                    lambda: (
                        MemoryRequest.objects.filter(tenant=tenant, status="pending").count() > 50
                    ),
                    what="the loud tenant's backlog",
                )
                quiet = httpx.Client(
                    base_url=base, headers={"Authorization": f"Bearer {quiet_key}"}, timeout=10
                )
                for n in range(5):
                    sent = time.monotonic()
                    body = {
                        "user_id": str(quiet_user.id),
                        "messages": [{"role": "user", "content": f"I like quiet{n}."}],
                    }
                    accepted = quiet.post("/v1/memories", json=body)
                    assert accepted.status_code == 202, accepted.text  # never refused
                    request_id = accepted.json()["request_id"]

                    def done(rid: str = request_id) -> bool:
                        return quiet.get(f"/v1/requests/{rid}").json()["status"] == "success"

                    wait_for(done, timeout=10, what=f"quiet job {n}")
                    assert time.monotonic() - sent < 10
            finally:
                stop.set()
                for each in floods:
                    each.join()


@pytest.mark.django_db
def test_one_tenants_waiting_jobs_are_capped_per_lane_and_high_is_a_per_tenant_allowance(
    settings, api, other_api, end_user, other_tenant
) -> None:
    from memories import accounts

    settings.TENANT_MAX_PENDING = 2
    settings.TENANT_HIGH_MAX_PENDING = 1
    settings.BACKPRESSURE_CACHE_SECONDS = 0
    other_user = accounts.end_user_create(tenant=other_tenant)
    assert [job(api, end_user, f"I like a{n}.").status_code for n in range(3)] == [202, 202, 429]
    assert job(other_api, other_user, "I like b.").status_code == 202  # another tenant's share
    high = [job(api, end_user, f"I like h{n}.", priority="high").status_code for n in range(2)]
    assert high == [202, 429]
    assert job(other_api, other_user, "I like hb.", priority="high").status_code == 202


@pytest.mark.django_db
def test_the_rate_limit_charges_a_batch_its_items(settings, api, end_user) -> None:
    settings.RATE_LIMIT_PER_SECOND = 1
    settings.RATE_LIMIT_BURST = 10
    items = [{"user_id": str(end_user.id), "content": f"Fact {n}"} for n in range(30)]
    first = api.post("/v1/memories/batch", {"items": items}, format="json")
    assert first.status_code == 200  # let in while the bucket held a token, into debt
    after = api.get("/v1/requests")
    assert after.status_code == 429 and int(after["Retry-After"]) >= 15  # the debt is paid first


@pytest.mark.django_db
def test_embedding_calls_from_web_threads_are_bounded(settings, api, end_user) -> None:
    import threading

    from memories import backpressure

    settings.WEB_EMBEDDING_CONCURRENCY = 1
    settings.WEB_EMBEDDING_WAIT_SECONDS = 0.1
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with backpressure.embedding_slot():
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(5)
        body = {"user_id": str(end_user.id), "query": "anything"}
        refused = api.post("/v1/memories/search", body, format="json")
        assert refused.status_code == 429 and "Retry-After" in refused
    finally:
        release.set()
        holder.join()
    assert api.post("/v1/memories/search", body, format="json").status_code == 200
