"""Webhooks: the HTTP contract, and signed deliveries to a real receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from memories import sessions
from memories.consumer_groups import consumer_for
from memories.events.stream import STREAM_KEY, redis_client
from tests.helpers import wait_for
from webhooks import targets
from webhooks.models import Webhook, WebhookDelivery
from webhooks.services import webhook_deliveries_resend, webhook_delivery_attempt


class Receiver:
    """An HTTP server on loopback that records each POST and answers the next scripted status
    (the last one repeats), after `delay` seconds, with `body` and `headers`."""

    def __init__(
        self,
        statuses: list[int],
        *,
        delay: float = 0,
        body: bytes = b"ok",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request_body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), request_body))
                index = min(len(receiver.requests), len(receiver.statuses)) - 1
                time.sleep(delay)
                self.send_response(receiver.statuses[index])
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver(settings) -> Iterator[Callable[..., Receiver]]:
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True  # the receivers listen on loopback
    started: list[Receiver] = []

    def start(*statuses: int, **options: Any) -> Receiver:
        started.append(Receiver(list(statuses) or [200], **options))
        return started[-1]

    yield start
    for each in started:
        each.server.shutdown()
        each.server.server_close()


class FakeDNS:
    """The resolver webhooks use, answering from `names` (literal addresses as themselves) and
    logging each lookup: no test resolves a name through the network."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {
            "example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
            "localhost": ["127.0.0.1", "::1"],
        }
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


@pytest.fixture(autouse=True)
def dns(monkeypatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(targets, "resolve", fake)
    return fake


@pytest.fixture
def empty_stream() -> None:
    redis_client().delete(STREAM_KEY)


def assert_signed(headers: dict[str, str], body: bytes, secret: str) -> None:
    timestamp = headers["X-Memory-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert headers["X-Memory-Signature"] == f"sha256={expected.hexdigest()}"


def create_webhook(api: APIClient, url: str, **body: object) -> dict:
    response = api.post("/v1/webhooks", {"url": url, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def deliveries(api: APIClient, webhook_id: str) -> list[dict]:
    response = api.get(f"/v1/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.content
    return response.json()["deliveries"]


# --- The HTTP contract ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_returns_201_with_the_secret_once_and_lists_without_it(api) -> None:
    created = create_webhook(
        api, "https://example.com/hook", event_types=["memory.created"], channels=["system:global"]
    )
    assert created["url"] == "https://example.com/hook"
    assert created["event_types"] == ["memory.created"]
    assert created["channels"] == ["system:global"]
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30

    response = api.get("/v1/webhooks")
    assert response.status_code == 200
    [listed] = response.json()["results"]
    assert listed["id"] == created["id"] and listed["event_types"] == ["memory.created"]
    assert "secret" not in listed and created["secret"] not in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "https://example.com", "event_types": ["memory.exploded"]}, "event_types"),
        ({"url": "https://example.com", "event_types": "memory.created"}, "event_types"),
        ({"url": "https://example.com", "channels": [{"a": 1}]}, "channels"),
    ],
)
def test_bad_input_is_400_naming_the_field(api, body: dict, field: str) -> None:
    response = api.post("/v1/webhooks", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["fields"]


@pytest.mark.django_db
def test_a_body_that_is_not_an_object_is_400(api) -> None:
    response = api.post("/v1/webhooks", ["https://example.com"], format="json")
    assert response.status_code == 400 and "body" in response.json()["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.0.0.5/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_private_and_loopback_targets_are_refused(api, url: str) -> None:
    response = api.post("/v1/webhooks", {"url": url}, format="json")
    assert response.status_code == 400 and "url" in response.json()["fields"]


@pytest.mark.django_db
def test_a_delivery_to_a_host_now_private_is_refused_not_sent(api, end_user, receiver, settings):
    target = receiver(200)
    webhook_id = create_webhook(api, target.url)["id"]
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False  # e.g. the name now resolves to loopback
    webhook = Webhook.objects.get(pk=webhook_id)
    delivery = WebhookDelivery.objects.create(
        webhook=webhook, event_id=uuid.uuid4(), stream_id="1-0", payload={"event_type": "x"}
    )
    webhook_delivery_attempt(delivery_id=str(delivery.id))
    delivery.refresh_from_db()
    assert target.requests == [] and delivery.last_error.startswith("Refused, nothing sent")


@pytest.mark.django_db
def test_another_tenants_webhook_is_404(api, other_api) -> None:
    webhook_id = create_webhook(api, "https://example.com/hook")["id"]
    assert other_api.get("/v1/webhooks").json()["results"] == []
    assert other_api.get(f"/v1/webhooks/{webhook_id}/deliveries").status_code == 404
    response = other_api.delete(f"/v1/webhooks/{webhook_id}")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert Webhook.objects.filter(pk=webhook_id).exists()


@pytest.mark.django_db
def test_delete_returns_204_and_the_webhook_is_gone(api) -> None:
    webhook_id = create_webhook(api, "https://example.com/hook")["id"]
    assert api.delete(f"/v1/webhooks/{webhook_id}").status_code == 204
    assert api.get("/v1/webhooks").json()["results"] == []
    assert api.delete(f"/v1/webhooks/{webhook_id}").status_code == 404
    assert api.get(f"/v1/webhooks/{uuid.uuid4()}/deliveries").status_code == 404


@pytest.mark.django_db
def test_webhooks_need_an_api_key() -> None:
    assert APIClient().get("/v1/webhooks").status_code == 401


# --- Deliveries ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_matching_event_is_delivered_once_signed_and_logged(
    api, other_api, end_user, receiver, empty_stream
) -> None:
    hook = receiver(200)
    webhook = create_webhook(api, hook.url, event_types=["session.started"])
    # These must not fire: another channel, another tenant.
    create_webhook(api, hook.url, channels=["topic:elsewhere:updates"])
    create_webhook(other_api, hook.url)

    session = sessions.session_start(user=end_user, agent_id="bot")
    sessions.session_add_messages(session=session, messages=[{"role": "user", "content": "hi"}])
    consumer = consumer_for("webhooks", consumer="w1")
    consumer.drain()

    [logged] = deliveries(api, webhook["id"])
    assert logged["status"] == "pending" and logged["attempts"] == 0
    assert logged["event_type"] == "session.started"
    assert WebhookDelivery.objects.count() == 1

    assert webhook_delivery_attempt(delivery_id=logged["id"]).status == "success"
    [(headers, body)] = hook.requests
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Memory-Event"] == "session.started"
    assert headers["X-Memory-Delivery"] == logged["id"]
    assert_signed(headers, body, webhook["secret"])
    event = json.loads(body)
    assert event["event_id"] == logged["event_id"]
    assert event["source"]["session_id"] == str(session.id)

    # The stream entries come again (a consumer crashed before acking): nothing is sent twice.
    redis_client().xgroup_setid(STREAM_KEY, "webhooks", "0")
    consumer.drain()
    assert webhook_delivery_attempt(delivery_id=logged["id"]).status == "noop"
    assert len(hook.requests) == 1
    [logged] = deliveries(api, webhook["id"])
    assert logged["status"] == "success" and logged["attempts"] == 1
    assert logged["last_status_code"] == 200 and logged["last_error"] == ""
    assert logged["delivered_at"] is not None and logged["next_attempt_at"] is None


@pytest.mark.django_db(transaction=True)
def test_a_receiver_failing_twice_gets_the_delivery_on_the_third_attempt_via_a_real_worker(
    api, end_user, receiver, empty_stream, start_worker
) -> None:
    start_worker(queues="batch", WEBHOOK_BACKOFF_SECONDS="0.2", WEBHOOK_ALLOW_PRIVATE_TARGETS="1")
    hook = receiver(500, 503, 200)
    webhook = create_webhook(api, hook.url)
    sessions.session_start(user=end_user)
    consumer_for("webhooks", consumer="w1").drain()

    wait_for(lambda: deliveries(api, webhook["id"])[0]["status"] == "success", what="success")
    [logged] = deliveries(api, webhook["id"])
    assert logged["attempts"] == 3 and logged["last_status_code"] == 200
    assert len(hook.requests) == 3
    assert {headers["X-Memory-Delivery"] for headers, _ in hook.requests} == {logged["id"]}
    for headers, body in hook.requests:
        assert_signed(headers, body, webhook["secret"])


@pytest.mark.django_db(transaction=True)
def test_a_receiver_that_always_fails_leaves_the_delivery_dead_after_max_attempts(
    api, end_user, receiver, empty_stream, settings
) -> None:
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    settings.WEBHOOK_BACKOFF_SECONDS = 0
    hook = receiver(500)
    webhook = create_webhook(api, hook.url)
    sessions.session_start(user=end_user)
    consumer_for("webhooks", consumer="w1").drain()
    [logged] = deliveries(api, webhook["id"])

    outcomes = [webhook_delivery_attempt(delivery_id=logged["id"]).status for _ in range(4)]

    assert outcomes == ["failed", "failed", "dead", "noop"]
    assert len(hook.requests) == 3
    [logged] = deliveries(api, webhook["id"])
    assert logged["status"] == "dead" and logged["attempts"] == 3
    assert logged["last_status_code"] == 500 and logged["last_error"].startswith("HTTP 500")
    assert logged["delivered_at"] is None


@pytest.mark.django_db(transaction=True)
def test_a_duplicate_task_before_the_retry_is_due_adds_no_attempt(
    api, end_user, receiver, empty_stream, settings
) -> None:
    settings.WEBHOOK_BACKOFF_SECONDS = 60
    hook = receiver(500)
    webhook = create_webhook(api, hook.url)
    sessions.session_start(user=end_user)
    consumer_for("webhooks", consumer="w1").drain()
    delivery_id = deliveries(api, webhook["id"])[0]["id"]

    first = webhook_delivery_attempt(delivery_id=delivery_id)
    again = webhook_delivery_attempt(delivery_id=delivery_id)

    assert first.status == "failed"
    assert again.status == "not_due" and again.next_attempt_at == first.next_attempt_at
    assert len(hook.requests) == 1
    assert WebhookDelivery.objects.get(pk=delivery_id).attempts == 1


@pytest.mark.django_db
def test_admin_lists_and_shows_webhooks_without_their_secret(api) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    created = create_webhook(api, "https://example.com/hook")
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", "r@example.com", "pw"))
    for page in ("/admin/webhooks/webhook/", f"/admin/webhooks/webhook/{created['id']}/change/",
                 "/admin/webhooks/webhookdelivery/"):  # fmt: skip
        response = admin.get(page)
        assert response.status_code == 200, page
        assert created["secret"] not in response.content.decode()


# --- Targets: resolved once, public only, pinned ---------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "addresses",
    [
        ["10.0.0.5"],
        ["127.0.0.1"],
        ["169.254.169.254"],  # the cloud metadata service
        ["100.64.12.7"],  # shared address space (carrier NAT)
        ["0.0.0.0"],
        ["224.0.0.251"],
        ["fd12:3456::1"],  # IPv6 unique local
        ["fe80::1"],
        ["::1"],
        ["::ffff:127.0.0.1"],  # IPv4-mapped
        ["::ffff:10.1.2.3"],
        ["2002:7f00:1::1"],  # 6to4 of 127.0.0.1
        ["93.184.215.14", "10.0.0.5"],  # one public, one not: refused
    ],
    ids=lambda addresses: "+".join(addresses),
)
def test_a_name_resolving_to_any_non_public_address_is_refused_at_registration(
    api, dns, addresses
) -> None:
    dns.names["internal.example"] = addresses
    response = api.post("/v1/webhooks", {"url": "https://internal.example/hook"}, format="json")
    assert response.status_code == 400 and "url" in response.json()["fields"]
    assert Webhook.objects.count() == 0


@pytest.mark.django_db
def test_a_name_that_does_not_resolve_is_refused_not_waved_through(api) -> None:
    response = api.post("/v1/webhooks", {"url": "https://nowhere.invalid/hook"}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"]["url"] == ["The host nowhere.invalid does not resolve."]


@pytest.mark.django_db
def test_only_ports_80_and_443_unless_allowed(api, settings) -> None:
    refused = api.post("/v1/webhooks", {"url": "https://example.com:8443/hook"}, format="json")
    assert refused.status_code == 400 and "8443" in refused.json()["fields"]["url"][0]
    settings.WEBHOOK_ALLOWED_PORTS = [443, 8443]
    accepted = api.post("/v1/webhooks", {"url": "https://example.com:8443/hook"}, format="json")
    assert accepted.status_code == 201


def _delivery_for(api: APIClient, url: str) -> WebhookDelivery:
    webhook = Webhook.objects.get(pk=create_webhook(api, url)["id"])
    return WebhookDelivery.objects.create(
        webhook=webhook, event_id=uuid.uuid4(), stream_id="1-0",
        payload={"event_type": "memory.created"},
    )  # fmt: skip


@pytest.mark.django_db
def test_a_name_public_at_registration_and_private_at_delivery_is_never_called(
    api, dns, receiver, settings
) -> None:
    hook = receiver(200)
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    settings.WEBHOOK_ALLOWED_PORTS = [hook.port]
    dns.names["rebind.example"] = ["93.184.215.14"]
    delivery = _delivery_for(api, f"http://rebind.example:{hook.port}/hook")
    dns.names["rebind.example"] = ["127.0.0.1"]  # the attacker's DNS answers anew
    assert webhook_delivery_attempt(delivery_id=str(delivery.id)).status == "failed"
    delivery.refresh_from_db()
    assert hook.requests == []
    assert delivery.last_error.startswith("Refused, nothing sent") and delivery.attempts == 1


@pytest.mark.django_db
def test_a_delivery_connects_to_the_address_it_checked_with_the_original_host(
    api, dns, receiver
) -> None:
    hook = receiver(200)
    dns.names["hooks.example"] = ["127.0.0.1"]
    delivery = _delivery_for(api, f"http://hooks.example:{hook.port}/hook")
    dns.lookups.clear()
    assert webhook_delivery_attempt(delivery_id=str(delivery.id)).status == "success"
    # One lookup, and the request went to its answer (no resolver but ours knows the name).
    assert dns.lookups == ["hooks.example"]
    [(headers, _)] = hook.requests
    assert headers["Host"] == f"hooks.example:{hook.port}"


@pytest.mark.django_db
def test_redirects_are_never_followed(api, receiver) -> None:
    elsewhere = receiver(200)
    hook = receiver(302, headers={"Location": elsewhere.url})
    delivery = _delivery_for(api, hook.url)
    assert webhook_delivery_attempt(delivery_id=str(delivery.id)).status == "failed"
    delivery.refresh_from_db()
    assert elsewhere.requests == [] and len(hook.requests) == 1
    assert delivery.last_status_code == 302 and "not followed" in delivery.last_error


@pytest.mark.django_db
def test_the_receivers_answer_is_never_stored_nor_shown(api, receiver) -> None:
    hook = receiver(500, body=b"<h1>internal admin</h1> db_password=hunter2")
    delivery = _delivery_for(api, hook.url)
    webhook_delivery_attempt(delivery_id=str(delivery.id))
    shown = api.get(f"/v1/webhooks/{delivery.webhook_id}/deliveries")
    assert b"hunter2" not in shown.content and b"internal admin" not in shown.content
    [logged] = shown.json()["deliveries"]
    assert logged["last_error"] == "HTTP 500." and logged["last_status_code"] == 500
    assert isinstance(logged["last_duration_ms"], int)


# --- No transaction while a receiver is called ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_slow_receiver_does_not_hold_back_pull_sync_of_another_tenant(
    api, other_api, other_tenant, receiver, settings
) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = settings.WEBHOOK_TOTAL_TIMEOUT_SECONDS = 20
    slow = receiver(200, delay=10)
    delivery = _delivery_for(api, slow.url)

    def attempt_then_close() -> None:
        webhook_delivery_attempt(delivery_id=str(delivery.id))
        connection.close()  # this thread's own connection, or the test database stays in use

    attempt = threading.Thread(target=attempt_then_close)
    attempt.start()
    try:
        wait_for(lambda: len(slow.requests) == 1, what="the receiver to be called")
        user = other_api.post("/v1/users", {}, format="json").json()["user_id"]
        item = {"user_id": user, "content": "Lives in Lisbon"}
        batch = other_api.post("/v1/memories/batch", {"items": [item]}, format="json")
        assert batch.status_code == 200, batch.content
        started = time.monotonic()

        def synced() -> list[str]:
            changes = other_api.get("/v1/sync", {"user_id": user}).json()["changes"]
            return [c["content"] for c in changes]

        # Pull-sync shows a change once every transaction older than it has ended, on the
        # whole server (another test's, running beside this one, too): seconds, not the 10 s
        # the receiver takes.
        wait_for(lambda: synced() == ["Lives in Lisbon"], timeout=5, what="the change in sync")
        assert time.monotonic() - started < 5  # not after the receiver's 10 s
    finally:
        attempt.join()
    delivery.refresh_from_db()
    assert delivery.status == "success"


@pytest.mark.django_db(transaction=True)
def test_deliveries_stranded_by_a_lost_message_or_a_dead_worker_are_sent_again_by_beat(
    api, receiver, start_worker, settings
) -> None:
    hook = receiver(200)
    lost = _delivery_for(api, hook.url)  # created, its task never sent
    died = _delivery_for(api, hook.url)  # a worker claimed it, then died mid-POST
    long_ago = timezone.now() - timedelta(minutes=5)
    WebhookDelivery.objects.filter(pk=lost.pk).update(next_attempt_at=long_ago)
    WebhookDelivery.objects.filter(pk=died.pk).update(
        status="sending", attempts=1, lease_until=long_ago, next_attempt_at=long_ago
    )
    fresh = _delivery_for(api, hook.url)  # just created: its own task is on its way
    WebhookDelivery.objects.filter(pk=fresh.pk).update(next_attempt_at=timezone.now())
    start_worker(queues="batch", WEBHOOK_ALLOW_PRIVATE_TARGETS="1")
    assert webhook_deliveries_resend() == 2
    wait_for(
        lambda: (
            set(
                WebhookDelivery.objects.filter(pk__in=[lost.pk, died.pk]).values_list(
                    "status", flat=True
                )
            )
            == {"success"}
        ),
        what="both to be delivered",
    )
    assert WebhookDelivery.objects.get(pk=died.pk).attempts == 2
    assert WebhookDelivery.objects.get(pk=fresh.pk).status == "pending"


@pytest.mark.django_db
def test_a_receiver_trickling_its_answer_is_cut_off_at_the_total_timeout(api, settings) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    settings.WEBHOOK_TIMEOUT_SECONDS = 1  # each byte comes well within it
    settings.WEBHOOK_TOTAL_TIMEOUT_SECONDS = 2
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        connection_, _ = listener.accept()
        with connection_:
            connection_.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
            for byte in answer:  # 0.2 s a byte: 40 s for the whole answer
                if stop.is_set():
                    return
                connection_.sendall(bytes([byte]))
                time.sleep(0.2)

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        delivery = _delivery_for(api, f"http://127.0.0.1:{port}/hook")
        started = time.monotonic()
        assert webhook_delivery_attempt(delivery_id=str(delivery.id)).status == "failed"
        assert time.monotonic() - started < 4
        delivery.refresh_from_db()
        assert delivery.last_error == "Timed out." and delivery.last_status_code is None
    finally:
        stop.set()
        listener.close()
