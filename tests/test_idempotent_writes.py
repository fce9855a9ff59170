"""`Idempotency-Key` on direct writes (PATCH, DELETE, a synchronous batch): the first answer again
for the same request, 422 for another, one application under concurrent duplicates, and errors
not stored (the key stays free)."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
from django.db import connection, transaction
from django.utils import timezone

from memories import accounts
from memories.models import IdempotentWrite, Memory, MemoryHistory
from tasks.sync import expire_idempotent_writes
from tests.helpers import store_memories, wait_for
from tests.live_server import uvicorn_live_server


def patch(api, memory_id, body: dict, key: str | None = "key-1", **headers: str):
    if key:
        headers["HTTP_IDEMPOTENCY_KEY"] = key
    return api.patch(f"/v1/memories/{memory_id}", body, format="json", **headers)


def batch(api, items: list[dict], key: str = "batch-1"):
    return api.post("/v1/memories/batch", {"items": items}, format="json", HTTP_IDEMPOTENCY_KEY=key)


@pytest.mark.django_db
def test_the_same_patch_sent_again_answers_the_first_response_and_applies_once(
    api, end_user
) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    first = patch(api, memory.id, {"content": "Lives in Lyon"})
    again = patch(api, memory.id, {"content": "Lives in Lyon"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["version"] == 2
    assert again["ETag"] == first["ETag"] == '"2"'
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    memory.refresh_from_db()
    assert memory.version == 2
    assert MemoryHistory.objects.filter(memory=memory, event="UPDATE").count() == 1


@pytest.mark.django_db
def test_the_same_key_with_another_body_is_422_and_changes_nothing(api, end_user) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    assert patch(api, memory.id, {"content": "Lives in Lyon"}).status_code == 200
    response = patch(api, memory.id, {"content": "Lives in Nice"})
    assert response.status_code == 422
    assert response.json()["error"] == "idempotency_key_reused"
    memory.refresh_from_db()
    assert memory.content == "Lives in Lyon"
    # Another path with the same key is another request too.
    [other] = store_memories(end_user, "Likes tea")
    assert patch(api, other.id, {"content": "Lives in Lyon"}).status_code == 422


@pytest.mark.django_db
def test_the_body_is_compared_as_json_not_as_bytes(api, end_user) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    body = {"content": "Lives in Lyon", "metadata": {"a": 1, "b": 2}}
    assert patch(api, memory.id, body).status_code == 200
    reordered = {"metadata": {"b": 2, "a": 1}, "content": "Lives in Lyon"}
    assert patch(api, memory.id, reordered)["Idempotent-Replayed"] == "true"


@pytest.mark.django_db
def test_a_delete_sent_again_answers_204_again_not_404(api, end_user) -> None:
    [memory] = store_memories(end_user, "A secret")
    first = api.delete(f"/v1/memories/{memory.id}", HTTP_IDEMPOTENCY_KEY="forget-1")
    again = api.delete(f"/v1/memories/{memory.id}", HTTP_IDEMPOTENCY_KEY="forget-1")
    assert first.status_code == again.status_code == 204
    assert again["Idempotent-Replayed"] == "true"
    assert api.delete(f"/v1/memories/{memory.id}").status_code == 404  # without a key: as before


@pytest.mark.django_db
def test_a_synchronous_batch_sent_again_writes_its_items_once(api, end_user) -> None:
    items = [{"action": "create", "user_id": str(end_user.id), "content": "Likes tea"}]
    first, again = batch(api, items), batch(api, items)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert Memory.objects.filter(user=end_user).count() == 1


@pytest.mark.django_db
def test_a_failed_first_attempt_is_not_stored_so_the_key_may_be_sent_again(api, end_user) -> None:
    # Decided: an error (4xx or 5xx) rolls back with its key. Sent again, the request is judged
    # afresh: a stale If-Match stays 412; once the base is right, the same key applies it.
    [memory] = store_memories(end_user, "Lives in Paris")
    body = {"content": "Lives in Lyon"}
    stale = patch(api, memory.id, body, HTTP_IF_MATCH='"7"')
    assert stale.status_code == 412
    assert not IdempotentWrite.objects.exists()
    fixed = patch(api, memory.id, body, HTTP_IF_MATCH='"1"')
    assert fixed.status_code == 200 and fixed.json()["version"] == 2
    missing = "00000000-0000-0000-0000-000000000000"
    assert patch(api, missing, body, key="key-2").status_code == 404
    assert patch(api, missing, body, key="key-2").status_code == 404  # not a replay
    assert "Idempotent-Replayed" not in patch(api, missing, body, key="key-2")


@pytest.mark.django_db
def test_keys_are_per_tenant(api, other_api, end_user, other_tenant) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    other_user = accounts.end_user_create(tenant=other_tenant, external_id="bob")
    [theirs] = store_memories(other_user, "Lives in Rome")
    assert patch(api, memory.id, {"content": "Lives in Lyon"}).status_code == 200
    response = patch(other_api, theirs.id, {"content": "Lives in Milan"})
    assert response.status_code == 200 and "Idempotent-Replayed" not in response


@pytest.mark.django_db
def test_an_overlong_key_is_400_naming_the_header(api, end_user) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    response = patch(api, memory.id, {"content": "Lives in Lyon"}, key="k" * 256)
    assert response.status_code == 400
    assert list(response.json()["fields"]) == ["Idempotency-Key"]


@pytest.mark.django_db
def test_an_expired_answer_is_deleted_by_beat_and_the_key_runs_afresh(
    api, end_user, settings
) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    assert patch(api, memory.id, {"content": "Lives in Lyon"}).status_code == 200
    IdempotentWrite.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    # Not yet swept: an expired key is taken afresh all the same.
    response = patch(api, memory.id, {"content": "Lives in Nice"})
    assert response.status_code == 200 and response.json()["version"] == 3
    IdempotentWrite.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expire_idempotent_writes() == 1
    assert not IdempotentWrite.objects.exists()


def _waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_two_duplicates_sent_at_once_are_applied_once_and_both_get_the_answer(
    tenant, end_user
) -> None:
    [memory] = store_memories(end_user, "Lives in Paris")
    _, key = accounts.api_key_create(tenant=tenant)
    release, locked = threading.Event(), threading.Event()

    def hold_the_memory() -> None:
        # The first duplicate waits here, holding its key; the second waits on the key.
        with transaction.atomic():
            Memory.objects.select_for_update().get(pk=memory.pk)
            locked.set()
            release.wait(10)
        connection.close()

    answers: list[httpx.Response] = []

    def send(base_url: str) -> None:
        answers.append(
            httpx.patch(
                f"{base_url}/v1/memories/{memory.id}",
                json={"content": "Lives in Lyon"},
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "same"},
                timeout=20,
            )
        )

    with uvicorn_live_server() as base_url:
        holder = threading.Thread(target=hold_the_memory)
        holder.start()
        assert locked.wait(5)
        senders = [threading.Thread(target=send, args=(base_url,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            wait_for(lambda: _waiting_on_locks() >= 2, timeout=10, what="both duplicates wait")
        finally:
            release.set()
            holder.join()
            for sender in senders:
                sender.join()
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == ["", "true"]
    memory.refresh_from_db()
    assert memory.version == 2
    assert MemoryHistory.objects.filter(memory=memory, event="UPDATE").count() == 1
