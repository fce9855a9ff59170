"""The operator's tools: `createapikey` and the Django admin."""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from memories import ledger
from memories.models import ApiKey, Memory, MemoryRequest, Tenant
from tests.helpers import store_memories, wait_for

pytestmark = pytest.mark.django_db


def test_createapikey_prints_a_working_key_on_its_last_line() -> None:
    out = io.StringIO()
    call_command("createapikey", "--tenant", "demo", stdout=out, stderr=io.StringIO())
    raw_key = out.getvalue().strip().splitlines()[-1]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    assert client.post("/v1/users", {}, format="json").status_code == 201
    assert Tenant.objects.get(name="demo").api_keys.count() == 1


@pytest.fixture
def admin_client() -> Client:
    user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_admin_shows_a_new_api_key_once(admin_client, tenant) -> None:
    response = admin_client.post(
        "/admin/memories/apikey/add/", {"tenant": str(tenant.id), "name": "ci"}, follow=True
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    raw_key = next(m for m in messages if "copy it now" in m).rsplit(" ", 1)[-1]
    assert sum(raw_key in m for m in messages) == 1
    assert (
        raw_key
        not in admin_client.get(
            f"/admin/memories/apikey/{ApiKey.objects.get().pk}/change/"
        ).content.decode()
    )
    assert ApiKey.objects.get(name="ci").key_hash != raw_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    assert client.post("/v1/users", {}, format="json").status_code == 201


@pytest.mark.django_db(transaction=True)  # the task is sent on commit
def test_admin_retry_action_sends_a_failed_request_again(
    admin_client, end_user, start_worker
) -> None:
    start_worker(queues="default")
    payload = {"messages": [{"role": "user", "content": "I live in Rome."}], "infer": True}
    memory_request = ledger.memory_request_submit(
        tenant_id=end_user.tenant_id, user_id=end_user.id, payload=payload
    )
    MemoryRequest.objects.filter(pk=memory_request.pk).update(
        status="failure", attempts=3, error="boom", holds_idempotency_slot=False
    )
    response = admin_client.post(
        "/admin/memories/memoryrequest/",
        {"action": "retry_failed", "_selected_action": [str(memory_request.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    # Sent again with a fresh set of attempts: the worker runs it to success.
    wait_for(lambda: MemoryRequest.objects.get(pk=memory_request.pk).status == "success")
    memory_request.refresh_from_db()
    assert (memory_request.attempts, memory_request.error) == (1, "")
    assert list(Memory.objects.filter(user=end_user).values_list("content", flat=True)) == [
        "Lives in Rome"
    ]


@pytest.mark.parametrize(
    ("key", "rival_text"),
    [("import-7", "I live in Oslo."), (None, "I live in Rome.")],
    ids=["its-key-names-another-request", "the-same-job-was-sent-again"],
)
def test_admin_retry_of_a_request_another_took_the_place_of_says_so(
    admin_client, end_user, key, rival_text
):
    def submit(text: str) -> MemoryRequest:
        payload = {"messages": [{"role": "user", "content": text}], "infer": True}
        return ledger.memory_request_submit(
            tenant_id=end_user.tenant_id,
            user_id=end_user.id,
            payload=payload,
            idempotency_key=key,
        )

    failed = submit("I live in Rome.")
    MemoryRequest.objects.filter(pk=failed.pk).update(
        status="failure", attempts=3, error="boom", holds_idempotency_slot=False
    )
    submit(rival_text)  # live now, in the failed one's place
    response = admin_client.post(
        "/admin/memories/memoryrequest/",
        {"action": "retry_failed", "_selected_action": [str(failed.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("an identical request is live" in m for m in messages), messages
    failed.refresh_from_db()
    assert failed.status == "failure"


def test_admin_pages_render(admin_client, end_user) -> None:
    for model in ("tenant", "apikey", "enduser", "memory", "memoryrequest", "memoryhistory"):
        assert admin_client.get(f"/admin/memories/{model}/").status_code == 200, model


def test_admin_edits_cannot_move_a_memory_or_a_user_to_another_owner(admin_client, end_user):
    # The database holds a memory to its user's tenant (memory_owner_fk): the forms offer no way
    # to break that, so no edit fails at commit.
    (memory,) = store_memories(end_user, "Lives in Paris")
    memory_form = admin_client.get(f"/admin/memories/memory/{memory.id}/change/")
    user_form = admin_client.get(f"/admin/memories/enduser/{end_user.id}/change/")
    assert memory_form.status_code == 200 and user_form.status_code == 200
    assert b'name="user"' not in memory_form.content
    assert b'name="tenant"' not in memory_form.content
    assert b'name="tenant"' not in user_form.content
    assert b'name="tenant"' in admin_client.get("/admin/memories/enduser/add/").content


def _change_form(memory: Memory, **changes: str) -> dict[str, str]:
    return {"content": memory.content, "metadata": json.dumps(memory.metadata), **changes}


@pytest.mark.django_db(transaction=True)  # events are published on commit
def test_an_admin_edit_is_a_new_version_in_the_history_and_the_event_stream(
    admin_client, api, end_user
) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris")
    old_vector = list(memory.embedding)
    response = admin_client.post(
        f"/admin/memories/memory/{memory.id}/change/",
        _change_form(memory, content="Lives in Lyon"),
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    memory.refresh_from_db()
    assert (memory.content, memory.version) == ("Lives in Lyon", 2)
    assert list(memory.embedding) != old_vector  # embedded again, so search finds the new text
    history = api.get(f"/v1/memories/{memory.id}/history").json()["history"]
    assert [(h["event"], h["old_content"], h["new_content"], h["actor"]) for h in history][-1] == (
        "UPDATE",
        "Lives in Paris",
        "Lives in Lyon",
        "admin:admin",
    )
    events = api.get("/v1/events", {"type": "memory.updated"}).json()["events"]
    assert [(e["memory"]["id"], e["memory"]["content"]) for e in events] == [
        (str(memory.id), "Lives in Lyon")
    ]


@pytest.mark.django_db(transaction=True)
def test_an_admin_delete_is_a_tombstone_with_its_history_and_event(
    admin_client, api, end_user
) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris")
    response = admin_client.post(f"/admin/memories/memory/{memory.id}/delete/", {"post": "yes"})
    assert response.status_code == 302
    memory.refresh_from_db()
    assert memory.deleted_at is not None  # kept, so pull-sync hands the deletion on
    assert api.get(f"/v1/memories/{memory.id}").status_code == 404
    events = api.get("/v1/events", {"type": "memory.deleted"}).json()["events"]
    assert [e["memory"]["id"] for e in events] == [str(memory.id)]


def test_the_admin_cannot_add_a_memory_that_no_job_embedded(admin_client) -> None:
    assert admin_client.get("/admin/memories/memory/add/").status_code == 403
