"""Smaller holes, each closed: what /readyz and /metrics tell whom, paginated history, a deleted
key's cache, the admin's one-time key, errors in our own words, the webhook cap."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages.storage.cookie import CookieStorage
from django.http import HttpRequest
from django.test import Client
from rest_framework.test import APIClient

from memories import accounts, memory_writes
from memories.models import ApiKey, MemoryRequest
from memories.pipeline import memory_request_run
from memories.providers.wiring import get_embedder
from tests.fake_openai import FakeResponse
from tests.helpers import store_memories, submit_job

pytestmark = pytest.mark.django_db


def test_readyz_names_the_dependency_down_but_never_the_exception(client, settings) -> None:
    from memoryproject.celery import app

    original = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there
    try:
        response = client.get("/readyz")
    finally:
        app.conf.broker_url = original
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "ok", "broker": "unavailable"}


def test_metrics_answer_loopback_only_unless_a_token_is_set(settings) -> None:
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 403
    settings.METRICS_TOKEN = "s3cret-token"
    remote = Client(REMOTE_ADDR="10.1.2.3")
    assert remote.get("/metrics").status_code == 401
    assert remote.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    good = remote.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert good.status_code == 200 and b"memory_jobs_total" in good.content


def test_memory_history_is_paginated_with_a_cursor(api, end_user) -> None:
    (memory,) = store_memories(end_user, "Version 0")
    for n in range(1, 6):
        memory_writes.memory_update(
            tenant_id=end_user.tenant_id,
            memory_id=memory.id,
            embedder=get_embedder(),
            content=f"Version {n}",
        )
    seen, cursor = [], None
    while True:
        page = api.get(
            f"/v1/memories/{memory.id}/history",
            {"limit": 2, **({"cursor": cursor} if cursor else {})},
        ).json()
        seen += [h["new_content"] for h in page["history"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"Version {n}" for n in range(1, 6)]
    bad = api.get(f"/v1/memories/{memory.id}/history", {"cursor": "yesterday"})
    assert bad.status_code == 400 and "cursor" in bad.json()["fields"]


def test_a_deleted_key_stops_working_at_once_despite_the_cache(tenant, settings) -> None:
    settings.API_KEY_CACHE_SECONDS = 300
    api_key, raw = accounts.api_key_create(tenant=tenant)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/v1/requests").status_code == 200  # read, and cached
    ApiKey.objects.filter(pk=api_key.pk).first().delete()
    assert client.get("/v1/requests").status_code == 401


def test_the_admins_one_time_key_never_travels_in_a_cookie(tenant) -> None:
    user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw")
    admin = Client()
    admin.force_login(user)
    response = admin.post("/admin/memories/apikey/add/", {"tenant": str(tenant.id), "name": "ci"})
    assert response.status_code == 302
    # What a messages cookie would carry, decoded as Django reads it back.
    carried = []
    if "messages" in response.cookies:
        cookie = CookieStorage(HttpRequest())._decode(response.cookies["messages"].value)
        carried = [str(message) for message in cookie or []]
    shown = admin.get(response["Location"]).content.decode()
    raw_key = shown.split("copy it now, it will not be shown again): ")[1].split("<")[0].strip()
    assert raw_key.startswith("mem_")
    assert not any(raw_key in message for message in carried)


def test_a_failed_job_says_what_failed_in_our_words_not_a_libraries(end_user, monkeypatch) -> None:
    from memories import pipeline

    def leaky(**kwargs):
        raise RuntimeError("connection to 10.0.0.7 failed: password=hunter2")

    monkeypatch.setattr(pipeline, "plan_changes", leaky)
    request = submit_job(end_user, "I like tea.")
    assert memory_request_run(request_id=str(request.id)) == "retry"
    request.refresh_from_db()
    assert "RuntimeError" in request.error and "hunter2" not in request.error


def test_a_provider_failure_is_told_without_the_providers_text(
    end_user, openai_settings, settings
) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 1

    openai_settings.chat_handler = lambda body: FakeResponse(
        500, {"error": {"message": "upstream secret: key sk-live-123"}}
    )
    request = submit_job(end_user, "I like tea.")
    memory_request_run(request_id=str(request.id))
    request.refresh_from_db()
    assert request.status == MemoryRequest.Status.FAILURE
    assert "HTTP 500" in request.error and "sk-live-123" not in request.error


def test_a_tenant_may_have_at_most_webhook_max_per_tenant_webhooks(api, settings) -> None:
    settings.WEBHOOK_MAX_PER_TENANT = 2
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    for _ in range(2):
        assert (
            api.post("/v1/webhooks", {"url": "http://127.0.0.1/hook"}, format="json").status_code
            == 201
        )
    refused = api.post("/v1/webhooks", {"url": "http://127.0.0.1/hook"}, format="json")
    assert refused.status_code == 409 and refused.json()["error"] == "limit_reached"
