"""Deleting erases: a forgotten memory and an erased user leave no trace of what was said in any
table, Redis key or stream entry, while everyone else's stays."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from django.conf import settings
from django.db import connection

from memories.consumer_groups import consumer_for
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver_url(settings) -> Iterator[str]:
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True  # the receiver listens on loopback
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def rows_holding(marker: str) -> dict[str, int]:
    """Rows of every table of the database whose text holds the marker, by table."""
    found = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )
        for (table,) in cursor.fetchall():
            cursor.execute(
                f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s', [f"%{marker}%"]
            )
            if count := cursor.fetchone()[0]:
                found[table] = count
    return found


def redis_keys_holding(marker: str) -> list[str]:
    """Keys of this test process's Redis database whose value holds the marker."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    needle = marker.encode()
    holding = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [*client.hgetall(key).keys(), *client.hgetall(key).values()]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "stream":
            values = [
                b"".join([*fields.keys(), *fields.values()]) for _, fields in client.xrange(key)
            ]
        else:
            values = []
        if any(needle in value for value in values):
            holding.append(key.decode())
    return holding


def _drain_consumers() -> None:
    for group in ("audit", "analytics", "webhooks"):
        consumer_for(group, consumer="erasure-test").drain()


def _wait_done(api, request_id: str, timeout: float = 60) -> dict:
    def done() -> bool:
        return api.get(f"/v1/requests/{request_id}").json()["status"] in ("success", "failure")

    wait_for(done, timeout=timeout, what=f"request {request_id}")
    status = api.get(f"/v1/requests/{request_id}").json()
    assert status["status"] == "success", status
    return status


def _user(api) -> str:
    return api.post("/v1/users", {}, format="json").json()["user_id"]


def test_an_erased_user_leaves_no_trace_of_what_they_said_and_others_keep_theirs(
    api, start_worker, receiver_url
) -> None:
    start_worker(queues="default,batch", WEBHOOK_ALLOW_PRIVATE_TARGETS="1")
    marker, other_marker = f"zebra{uuid.uuid4().hex[:10]}", f"okapi{uuid.uuid4().hex[:10]}"
    assert api.post("/v1/webhooks", {"url": receiver_url}, format="json").status_code == 201
    user, other = _user(api), _user(api)

    def job(user_id: str, text: str) -> str:
        body = {"user_id": user_id, "messages": [{"role": "user", "content": text}]}
        return api.post("/v1/memories", body, format="json").json()["request_id"]

    # Every door: a memory job, an async batch, a session's messages, a correction, webhooks,
    # the audit log and the event stream (the consumers below).
    _wait_done(api, job(user, f"I like {marker}."))
    _wait_done(api, job(other, f"I like {other_marker}."))
    batch = {"items": [{"user_id": user, "content": f"Owns a {marker} boat"}], "async": True}
    _wait_done(api, api.post("/v1/memories/batch", batch, format="json").json()["request_id"])
    session = api.post("/v1/sessions", {"user_id": user}, format="json").json()["session_id"]
    said = {"messages": [{"role": "user", "content": f"my {marker} is loud"}]}
    assert api.post(f"/v1/sessions/{session}/messages", said, format="json").status_code == 201
    first = api.get("/v1/memories", {"user_id": user}).json()["results"][0]["id"]
    correction = {"content": f"Likes {marker} a lot"}
    assert api.patch(f"/v1/memories/{first}", correction, format="json").status_code == 200
    api.post("/v1/memories/search", {"user_id": user, "query": marker}, format="json")
    _drain_consumers()
    assert rows_holding(marker) and redis_keys_holding(marker)  # it went in everywhere

    response = api.delete(f"/v1/users/{user}")
    assert response.status_code == 202
    receipt = _wait_done(api, response.json()["request_id"])["events"][0]
    assert receipt["memories"] == 2 and receipt["sessions"] == 1 and receipt["messages"] == 1

    assert rows_holding(marker) == {}
    assert redis_keys_holding(marker) == []
    assert marker not in api.get("/v1/events").content.decode()
    assert api.get(f"/v1/users/{user}").status_code == 404
    # The other user's words are all where they were.
    assert rows_holding(other_marker).get("memories_memory") == 1
    assert redis_keys_holding(other_marker)


def test_a_forgotten_memory_leaves_no_trace_of_what_it_said_and_the_next_one_stays(
    api, start_worker, receiver_url
) -> None:
    start_worker(queues="batch", WEBHOOK_ALLOW_PRIVATE_TARGETS="1")
    marker, kept = f"zebra{uuid.uuid4().hex[:10]}", f"okapi{uuid.uuid4().hex[:10]}"
    assert api.post("/v1/webhooks", {"url": receiver_url}, format="json").status_code == 201
    user = _user(api)
    items = [
        {"user_id": user, "content": f"Owns a {marker} boat", "metadata": {"tag": marker}},
        {"user_id": user, "content": f"Owns an {kept} farm"},
    ]
    batch = api.post("/v1/memories/batch", {"items": items, "async": True}, format="json")
    written = _wait_done(api, batch.json()["request_id"])["events"]
    forgotten = written[0]["id"]
    correction = {"content": f"Owns two {marker} boats"}
    assert api.patch(f"/v1/memories/{forgotten}", correction, format="json").status_code == 200
    _drain_consumers()
    assert rows_holding(marker) and redis_keys_holding(marker)

    assert api.delete(f"/v1/memories/{forgotten}").status_code == 204

    assert rows_holding(marker) == {}
    assert redis_keys_holding(marker) == []
    assert api.get(f"/v1/memories/{forgotten}").status_code == 404
    assert rows_holding(kept).get("memories_memory") == 1
    # Pull-sync still hands the deletion on: a content-free tombstone.
    changes = api.get("/v1/sync", {"user_id": user}).json()["changes"]
    [tombstone] = [c for c in changes if c["id"] == forgotten]
    assert tombstone["deleted"] is True


def test_a_user_with_10000_memories_is_erased_within_a_minute(api, start_worker) -> None:
    start_worker(queues="batch")
    user = _user(api)
    for start in range(0, 10_000, 1000):
        items = [
            {"user_id": user, "content": f"Fact {n} of many"} for n in range(start, start + 1000)
        ]
        assert api.post("/v1/memories/batch", {"items": items}, format="json").status_code == 200
    started = time.monotonic()
    request_id = api.delete(f"/v1/users/{user}").json()["request_id"]
    receipt = _wait_done(api, request_id, timeout=60)["events"][0]
    assert time.monotonic() - started < 60
    assert receipt["memories"] == 10_000 and receipt["history"] == 10_000


def test_what_an_erased_user_wrote_into_a_shared_scope_stays_with_the_tenant(api, end_user) -> None:
    from memories import erasure
    from memories.models import Memory
    from tests.helpers import store_memories

    (own,) = store_memories(end_user, "Likes tea")
    (shared,) = store_memories(end_user, "The office opens at 9", scope="tenant")
    request = erasure.user_erasure_submit(user=end_user)
    assert erasure.user_erasure_run(request_id=str(request.id)) == "done"
    assert not Memory.objects.filter(pk=own.pk).exists()
    kept = Memory.objects.get(pk=shared.pk)
    assert (kept.user_id, kept.content, kept.tenant_id) == (
        None,
        "The office opens at 9",
        end_user.tenant_id,
    )
    request.refresh_from_db()
    assert request.result[0]["shared_memories_detached"] == 1
