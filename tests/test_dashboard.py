"""The staff dashboard without a browser: who may see it, what it shows, the retry form's CSRF
guard, the per-second series in Redis (memories.timeseries), and the session-authorized feed
(/dashboard/stream) over real HTTP. The browser test is tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from memories import accounts, timeseries
from memories.events.stream import redis_client
from memories.models import EndUser, MemoryRequest, Tenant
from tests.live_server import uvicorn_live_server


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("ops", password="pw-ops-123", is_staff=True)


@pytest.fixture
def staff_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


def dead_letter(tenant: Tenant, user: EndUser, *, error: str = "LLM said no") -> MemoryRequest:
    return MemoryRequest.objects.create(
        tenant=tenant,
        user=user,
        request_hash=f"dead-{time.monotonic_ns()}",
        payload={"messages": [{"role": "user", "content": "I like tea"}]},
        status=MemoryRequest.Status.FAILURE,
        holds_idempotency_slot=False,
        attempts=3,
        error=error,
        expires_at=timezone.now() + timedelta(hours=1),
        finished_at=timezone.now(),
    )


def write_memory(api: APIClient, user: EndUser, content: str, **extra) -> dict:
    response = api.post(
        "/v1/memories/direct", {"user_id": str(user.id), "content": content, **extra}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


# --- Who may see it ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_visitor_is_sent_to_the_login_page():
    response = Client().get("/dashboard/?tenant=x")
    assert response.status_code == 302
    assert response["Location"].startswith("/dashboard/login/?next=/dashboard/")


@pytest.mark.django_db
def test_signed_in_user_who_is_not_staff_is_refused_403():
    client = Client()
    client.force_login(User.objects.create_user("visitor", password="pw-visitor-1"))
    assert client.get("/dashboard/").status_code == 403
    assert client.get("/dashboard/series").status_code == 403


@pytest.mark.django_db
def test_staff_signs_in_with_the_login_form_and_lands_on_the_dashboard(staff):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/dashboard/login/")
    token = page.cookies["csrftoken"].value
    response = client.post(
        "/dashboard/login/",
        {"username": "ops", "password": "pw-ops-123", "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302 and response["Location"] == "/dashboard/"
    assert client.get("/dashboard/").status_code == 200


# --- What it shows -------------------------------------------------------------------------------


def test_dashboard_shows_a_users_memories_dead_letters_and_queue(
    staff_client, tenant, end_user, api
):
    write_memory(api, end_user, "Prefers green tea")
    failed = dead_letter(tenant, end_user)
    page = staff_client.get(f"/dashboard/?tenant={tenant.id}&user={end_user.id}")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Prefers green tea" in html
    assert str(failed.id) in html and "LLM said no" in html
    counts = page.context["queue"]
    assert dict(counts)["failure"] == [0, 1, 0]  # high, default, batch


def test_search_box_filters_by_mode_and_type(staff_client, tenant, end_user, api):
    write_memory(api, end_user, "Drinks green tea every morning")
    write_memory(api, end_user, "Tea shop list", type="list", items=["green tea"])
    base = f"/dashboard/?tenant={tenant.id}&user={end_user.id}&q=tea"
    found = staff_client.get(f"{base}&mode=keyword").context["memories"]
    # A search's rows are the API's result documents (a list's rows are memories).
    assert {row["memory"]["content"] for row in found} >= {"Drinks green tea every morning"}
    only_lists = staff_client.get(f"{base}&mode=keyword&type=list").context["memories"]
    assert [row["memory"]["type"] for row in only_lists] == ["list"]
    bad = staff_client.get(f"{base}&type=nonsense")
    assert bad.context["memories"] == [] and "Must be one of" in bad.context["search_error"]


def test_memory_page_shows_its_version_and_history(staff_client, tenant, end_user, api):
    memory = write_memory(api, end_user, "Lives in Paris")
    patched = api.patch(
        f"/v1/memories/{memory['id']}", {"content": "Lives in Berlin"}, format="json"
    )
    assert patched.status_code == 200
    page = staff_client.get(f"/dashboard/memories/{memory['id']}/?tenant={tenant.id}")
    html = page.content.decode()
    assert page.status_code == 200
    assert '<td id="memory-version">2</td>' in html
    assert [entry.event for entry in page.context["history"]] == ["ADD", "UPDATE"]
    assert "Lives in Paris" in html and "Lives in Berlin" in html


# --- The retry form -------------------------------------------------------------------------------


def test_retry_without_a_csrf_token_is_refused_and_changes_nothing(staff, tenant, end_user):
    failed = dead_letter(tenant, end_user)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    response = client.post(f"/dashboard/requests/{failed.id}/retry", {"tenant": str(tenant.id)})
    assert response.status_code == 403
    failed.refresh_from_db()
    assert failed.status == MemoryRequest.Status.FAILURE


def test_retry_with_the_forms_token_sends_the_dead_letter_again(staff, tenant, end_user):
    failed = dead_letter(tenant, end_user)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    page = client.get(f"/dashboard/?tenant={tenant.id}")
    token = page.context["csrf_token"]
    response = client.post(
        f"/dashboard/requests/{failed.id}/retry",
        {"tenant": str(tenant.id), "csrfmiddlewaretoken": token},
        follow=True,
    )
    assert response.status_code == 200
    assert f"Request {failed.id} sent again." in response.content.decode()
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.error) == ("pending", 0, "")


def test_retry_of_another_tenants_request_is_404(staff_client, tenant, other_tenant, end_user):
    failed = dead_letter(tenant, end_user)
    response = staff_client.post(
        f"/dashboard/requests/{failed.id}/retry", {"tenant": str(other_tenant.id)}
    )
    assert response.status_code == 404


# --- The series in Redis --------------------------------------------------------------------------


def test_latency_percentiles_come_from_the_per_second_histogram(db):
    redis_client().flushdb()
    for seconds in [0.010] * 98 + [2.0, 2.0]:
        with redis_client().pipeline() as pipe:
            timeseries.job_finished(pipe, seconds=seconds)
            pipe.execute()
    data = timeseries.series(redis_client(), seconds=5)
    p50 = [value for value in data["p50"] if value is not None]
    p99 = [value for value in data["p99"] if value is not None]
    # Buckets are at most 20% wide, upwards.
    assert p50 and all(0.010 <= value <= 0.012 for value in p50)
    assert any(2.0 <= value <= 2.4 for value in p99)
    key = f"{timeseries.KEY_PREFIX}{int(time.time())}"
    ttl = redis_client().ttl(key)
    assert 0 < ttl <= timeseries.SERIES_TTL_SECONDS


@pytest.mark.django_db(transaction=True)  # events are published after a real commit
def test_published_events_are_counted_per_second_in_all_and_per_tenant(
    tenant, other_tenant, end_user, api
):
    redis_client().flushdb()
    write_memory(api, end_user, "Likes jazz")
    write_memory(api, end_user, "Plays the piano")
    data = timeseries.series(redis_client(), seconds=10, tenant_id=str(tenant.id))
    assert sum(data["tenant_events"]) == 2
    assert sum(data["events"]) == 2
    other = timeseries.series(redis_client(), seconds=10, tenant_id=str(other_tenant.id))
    assert sum(other["tenant_events"]) == 0


def test_lane_depth_samples_and_the_series_endpoint(staff_client, tenant, monkeypatch):
    redis_client().flushdb()
    # This process may have sampled the lanes already in this second (before the flush).
    monkeypatch.setattr(timeseries, "_last_lane_sample", 0)
    redis_client().rpush("batch", "a", "b", "c")  # three messages waiting in the batch lane
    data = staff_client.get(f"/dashboard/series?tenant={tenant.id}").json()
    assert len(data["t"]) == timeseries.WINDOW_SECONDS
    assert data["lanes"]["batch"][-1] == 3 or data["lanes"]["batch"][-2] == 3
    assert set(data) >= {"events", "tenant_events", "p50", "p99", "lanes"}


# --- The feed over real HTTP ----------------------------------------------------------------------


@pytest.fixture
def server(transactional_db) -> Iterator[str]:
    with uvicorn_live_server() as base_url:
        yield base_url


def _session_cookie(user: User) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


def _first_event(base_url: str, query: str, cookies: dict[str, str], write) -> dict:
    with (
        httpx.Client(base_url=base_url, cookies=cookies, timeout=5) as http,
        http.stream("GET", f"/dashboard/stream?{query}") as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == ": subscribed"
        write()
        for line in lines:
            if line.startswith("data: "):
                return json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended without an event")


@pytest.mark.django_db(transaction=True)
def test_staff_session_hears_every_event_of_the_tenant_live(server, staff, tenant, api):
    alice = EndUser.objects.create(tenant=tenant, external_id="alice")
    event = _first_event(
        server,
        f"tenant={tenant.id}",
        _session_cookie(staff),
        lambda: write_memory(api, alice, "Collects stamps"),
    )
    assert event["event_type"] == "memory.created"
    assert event["memory"]["content"] == "Collects stamps"


@pytest.mark.django_db(transaction=True)
def test_dashboard_stream_refuses_without_a_staff_session(server, tenant):
    visitor = User.objects.create_user("visitor", password="pw-visitor-1")
    for cookies in ({}, {"sessionid": "forged"}, _session_cookie(visitor)):
        response = httpx.get(
            f"{server}/dashboard/stream?tenant={tenant.id}", cookies=cookies, timeout=5
        )
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden"


@pytest.mark.django_db(transaction=True)
def test_an_api_key_cannot_ask_v1_stream_for_the_dashboards_tenant_wide_feed(server, tenant):
    key = accounts.api_key_create(tenant=tenant)[1]
    response = httpx.get(
        f"{server}/v1/stream?channels=*",
        headers={"Authorization": f"Bearer {key}"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["fields"] == {"channels": [response.json()["message"]]}


@pytest.mark.django_db(transaction=True)
def test_signing_out_ends_an_open_dashboard_stream(server, staff, tenant, monkeypatch):
    from dashboard import stream

    monkeypatch.setattr(stream, "SESSION_RECHECK_SECONDS", 0.2)
    client = Client()
    client.force_login(staff)
    cookies = {"sessionid": client.cookies["sessionid"].value}
    with (
        httpx.Client(base_url=server, cookies=cookies, timeout=5) as http,
        http.stream("GET", f"/dashboard/stream?tenant={tenant.id}") as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == ": subscribed"
        started = time.monotonic()
        client.logout()  # the session row is deleted
        assert not any(lines)  # the body ends, with no event (a read timeout would raise)
        assert time.monotonic() - started < 3
