"""Waiting without polling: `GET /v1/requests/{id}?wait=` and `POST /v1/memories` with "wait"
answer as soon as the job ends (woken by the ledger's announcement, not by a poll), else with the
status when the wait runs out; a waiting call holds no web thread. Through the real ASGI app."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from django.conf import settings

from memories import accounts
from memories.models import MemoryRequest
from tests.fake_openai import FakeOpenAI
from tests.helpers import model_env, submit_job
from tests.live_server import uvicorn_live_server

pytestmark = pytest.mark.django_db(transaction=True)


def client(base: str, tenant) -> httpx.Client:
    _, key = accounts.api_key_create(tenant=tenant)
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def job(user, text: str = "I live in Paris.", **extra) -> dict:
    return {"user_id": str(user.id), "messages": [{"role": "user", "content": text}], **extra}


def test_a_waiting_status_call_answers_when_the_job_ends_not_when_the_wait_runs_out(
    tenant, end_user, start_worker
) -> None:
    with FakeOpenAI(delay_seconds=0.4, dimensions=settings.EMBEDDING_DIMENSIONS) as fake:
        start_worker(queues="high,default", **model_env(fake))
        with uvicorn_live_server() as base, client(base, tenant) as http:
            accepted = http.post("/v1/memories", json=job(end_user))
            assert accepted.status_code == 202
            request_id = accepted.json()["request_id"]
            asked = time.monotonic()
            answer = http.get(f"/v1/requests/{request_id}", params={"wait": 15})
            waited = time.monotonic() - asked
    assert answer.status_code == 200 and answer.json()["status"] == "success"
    assert "x-memory-wait-seconds" not in answer.headers
    assert waited < 10, waited  # woken when it ended (two 0.4 s model calls), not at 15 s


def test_a_job_posted_with_wait_answers_200_with_its_finished_status(
    tenant, end_user, start_worker
) -> None:
    start_worker(queues="high,default")  # the offline providers: done in milliseconds
    with uvicorn_live_server() as base, client(base, tenant) as http:
        answer = http.post("/v1/memories", json=job(end_user, wait=15))
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "success"
        assert [e["content"] for e in answer.json()["events"]] == ["Lives in Paris"]
        # "wait" is not part of the request: the same job without it is the live duplicate.
        again = http.post("/v1/memories", json=job(end_user))
        assert (
            again.status_code == 409 and again.json()["request_id"] == answer.json()["request_id"]
        )


def test_when_the_wait_runs_out_get_answers_the_status_and_post_its_202(tenant, end_user) -> None:
    # No worker: the job stays pending.
    with uvicorn_live_server() as base, client(base, tenant) as http:
        asked = time.monotonic()
        accepted = http.post("/v1/memories", json=job(end_user, wait=0.5))
        assert accepted.status_code == 202 and accepted.json()["status"] == "pending"
        assert time.monotonic() - asked >= 0.5
        request_id = accepted.json()["request_id"]
        asked = time.monotonic()
        status = http.get(f"/v1/requests/{request_id}", params={"wait": 0.5})
        assert status.status_code == 200 and status.json()["status"] == "pending"
        assert time.monotonic() - asked >= 0.5
        assert "x-memory-wait-seconds" not in status.headers


def test_waiting_calls_hold_no_web_thread(tenant, end_user) -> None:
    request_id = str(submit_job(end_user, "I like tea.").id)  # pending: no worker
    waiting = settings.WEB_THREADS + 4
    with uvicorn_live_server() as base, client(base, tenant) as http:
        waiters = [
            threading.Thread(
                target=lambda: http.get(f"/v1/requests/{request_id}", params={"wait": 4})
            )
            for _ in range(waiting)
        ]
        for waiter in waiters:
            waiter.start()
        time.sleep(0.5)  # every waiter is in
        asked = time.monotonic()
        answer = http.get(f"/v1/requests/{request_id}")
        answered_in = time.monotonic() - asked
        for waiter in waiters:
            waiter.join()
    assert answer.status_code == 200 and answered_in < 2.5, answered_in  # not after the waits


def test_a_bad_wait_is_a_400_naming_it(api, end_user) -> None:
    request = submit_job(end_user, "I like tea.")
    for wait in ("soon", "21", "-1"):
        response = api.get(f"/v1/requests/{request.id}", {"wait": wait})
        assert response.status_code == 400 and "wait" in response.json()["fields"], wait
    response = api.post("/v1/memories", job(end_user, wait=60), format="json")
    assert response.status_code == 400 and "wait" in response.json()["fields"]
    assert MemoryRequest.objects.count() == 1
