"""The HTTP contract: one test per status code the API promises."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from memories import accounts, erasure, ledger, memory_writes
from memories.models import ApiKey, Memory, MemoryHistory, MemoryRequest
from tests.helpers import store_memories

pytestmark = pytest.mark.django_db

JOB = {"messages": [{"role": "user", "content": "I live in Paris."}]}


def submit(api: APIClient, user_id, body: dict | None = None, **headers):
    return api.post(
        "/v1/memories", {"user_id": str(user_id), **(body or JOB)}, format="json", **headers
    )


# --- Authentication ------------------------------------------------------------------------------


def test_missing_api_key_is_401(end_user) -> None:
    response = APIClient().post("/v1/users", {}, format="json")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


def test_invalid_api_key_is_401(db) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer mem_not-a-real-key")
    assert client.get(f"/v1/users/{uuid.uuid4()}").status_code == 401


def test_api_keys_are_stored_hashed(tenant) -> None:
    api_key, raw_key = accounts.api_key_create(tenant=tenant)
    api_key.refresh_from_db()
    assert raw_key not in api_key.key_hash and len(api_key.key_hash) == 64


def _key_client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def test_a_key_revoked_in_this_process_is_refused_at_once(end_user) -> None:
    api_key, raw_key = accounts.api_key_create(tenant=end_user.tenant)
    client = _key_client(raw_key)
    assert client.get(f"/v1/users/{end_user.id}").status_code == 200
    api_key.revoked_at = timezone.now()
    api_key.save()  # as the admin does
    assert client.get(f"/v1/users/{end_user.id}").status_code == 401


def test_a_key_revoked_elsewhere_is_refused_once_the_key_cache_lapses(settings, end_user) -> None:
    settings.API_KEY_CACHE_SECONDS = 0.3
    api_key, raw_key = accounts.api_key_create(tenant=end_user.tenant)
    client = _key_client(raw_key)
    assert client.get(f"/v1/users/{end_user.id}").status_code == 200
    # An UPDATE without signals, as a revocation by another web process looks from here.
    ApiKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())
    time.sleep(0.4)
    assert client.get(f"/v1/users/{end_user.id}").status_code == 401


def test_a_cached_key_still_expires_on_time(end_user) -> None:
    expires_at = timezone.now() + timedelta(seconds=0.5)
    _, raw_key = accounts.api_key_create(tenant=end_user.tenant, expires_at=expires_at)
    client = _key_client(raw_key)
    assert client.get(f"/v1/users/{end_user.id}").status_code == 200
    time.sleep(0.6)
    assert client.get(f"/v1/users/{end_user.id}").status_code == 401


# --- Users ---------------------------------------------------------------------------------------


def test_create_user_returns_201_with_user_id(api) -> None:
    response = api.post("/v1/users", {"external_id": "bob"}, format="json")
    assert response.status_code == 201
    user_id = response.json()["user_id"]
    assert api.get(f"/v1/users/{user_id}").json()["external_id"] == "bob"


def test_create_user_alias_works_without_a_body(api) -> None:
    response = api.post("/create/user")
    assert response.status_code == 201
    assert uuid.UUID(response.json()["user_id"])


def test_duplicate_external_id_is_409(api) -> None:
    api.post("/v1/users", {"external_id": "bob"}, format="json")
    response = api.post("/v1/users", {"external_id": "bob"}, format="json")
    assert response.status_code == 409


def test_user_of_another_tenant_is_404(end_user, other_api) -> None:
    assert other_api.get(f"/v1/users/{end_user.id}").status_code == 404
    assert submit(other_api, end_user.id).status_code == 404
    assert other_api.delete(f"/v1/users/{end_user.id}").status_code == 404


def _check_constraints_now() -> None:
    """Foreign keys are checked at commit, which a test's rolled-back transaction never reaches:
    have PostgreSQL check them at each statement instead."""
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def _memory(**owner) -> Memory:
    return Memory.objects.create(
        **owner, content="x", embedding=[1.0] + [0.0] * 383, content_hash="h"
    )


def test_deleting_a_user_is_an_erasure_job_that_removes_their_memories(api, end_user) -> None:
    _check_constraints_now()
    memory = _memory(tenant=end_user.tenant, user=end_user)
    MemoryHistory.objects.create(memory=memory, event="ADD", new_content="x")
    response = api.delete(f"/v1/users/{end_user.id}")
    assert response.status_code == 202 and response.json()["status"] == "pending"
    request_id = response.json()["request_id"]
    # From now on the user is gone to the API, while the job runs.
    assert api.get(f"/v1/users/{end_user.id}").status_code == 404
    body = {"user_id": str(end_user.id), "messages": [{"role": "user", "content": "I like tea."}]}
    assert api.post("/v1/memories", body, format="json").status_code == 404
    assert erasure.user_erasure_run(request_id=request_id) == "done"  # what the worker runs
    assert not Memory.objects.filter(user_id=end_user.id).exists()
    assert not MemoryHistory.objects.filter(memory_id=memory.id).exists()
    erased = api.get(f"/v1/requests/{request_id}").json()
    assert erased["status"] == "success" and erased["kind"] == "erasure"
    assert erased["events"][0]["memories"] == 1 and erased["events"][0]["history"] == 1


def test_the_database_holds_a_memory_to_its_users_tenant(end_user, other_tenant) -> None:
    _check_constraints_now()
    with pytest.raises(IntegrityError), transaction.atomic():
        _memory(tenant=other_tenant, user=end_user)
    with pytest.raises(IntegrityError), transaction.atomic():
        _memory(tenant=end_user.tenant, user_id=uuid.uuid4())
    assert _memory(tenant=end_user.tenant, user=end_user).user_id == end_user.id


# --- Memory jobs ---------------------------------------------------------------------------------


def test_memory_job_is_accepted_with_202_and_pending(api, end_user) -> None:
    response = submit(api, end_user.id)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "pending"
    status = api.get(f"/v1/requests/{body['request_id']}").json()
    assert status["status"] == "pending" and status["events"] == []
    assert api.get(f"/get_status/{body['request_id']}").json()["request_id"] == body["request_id"]


def test_memory_job_for_unknown_user_is_404(api) -> None:
    response = submit(api, uuid.uuid4())
    assert response.status_code == 404
    assert not MemoryRequest.objects.exists()


def test_duplicate_request_returns_409_with_original_id(api, end_user) -> None:
    first = submit(api, end_user.id).json()
    second = submit(api, end_user.id)
    assert second.status_code == 409
    assert second.json()["request_id"] == first["request_id"]
    assert second.json()["status"] == "pending"
    assert MemoryRequest.objects.count() == 1


def test_a_duplicate_that_finished_meanwhile_is_409_telling_to_send_again(
    api, end_user, monkeypatch
) -> None:
    # The race the guarded insert leaves: its slot was taken, but by the time the duplicate is
    # looked up it has finished and released the slot. The caller is told to send again.
    # (None: not inserted.)
    monkeypatch.setattr(ledger, "_memory_request_insert", lambda memory_request: None)
    response = submit(api, end_user.id)
    assert response.status_code == 409
    assert "send it again" in response.json()["message"]
    assert "request_id" not in response.json()
    assert not MemoryRequest.objects.exists()


def test_a_different_body_is_a_different_job(api, end_user) -> None:
    submit(api, end_user.id)
    other = {"messages": [{"role": "user", "content": "I like tea."}]}
    assert submit(api, end_user.id, other).status_code == 202


def test_failed_request_may_be_sent_again(api, end_user) -> None:
    first = submit(api, end_user.id).json()
    MemoryRequest.objects.filter(pk=first["request_id"]).update(
        status="failure", holds_idempotency_slot=False
    )
    again = submit(api, end_user.id)
    assert again.status_code == 202
    assert again.json()["request_id"] != first["request_id"]


@override_settings(MEMORY_REQUEST_TTL_SECONDS=0)
def test_expired_request_no_longer_blocks_its_duplicate(api, end_user) -> None:
    submit(api, end_user.id)
    assert submit(api, end_user.id).status_code == 202


def test_same_idempotency_key_and_body_is_409(api, end_user) -> None:
    first = submit(api, end_user.id, HTTP_IDEMPOTENCY_KEY="k-1").json()
    again = submit(api, end_user.id, HTTP_IDEMPOTENCY_KEY="k-1")
    assert again.status_code == 409 and again.json()["request_id"] == first["request_id"]


def test_same_idempotency_key_with_other_body_is_422(api, end_user) -> None:
    submit(api, end_user.id, HTTP_IDEMPOTENCY_KEY="k-1")
    other = {"messages": [{"role": "user", "content": "I like tea."}]}
    response = submit(api, end_user.id, other, HTTP_IDEMPOTENCY_KEY="k-1")
    assert response.status_code == 422
    assert MemoryRequest.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": "I live in Paris"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "metadata": "not-an-object"}, "metadata"),
        ({"messages": [{"role": "user", "content": "x"}], "priority": "urgent"}, "priority"),
        ({"messages": [{"role": "user", "content": "x"}], "infer": "perhaps"}, "infer"),
    ],
)
def test_bad_job_body_is_400_naming_the_field(api, end_user, body, field) -> None:
    response = submit(api, end_user.id, body)
    assert response.status_code == 400
    assert field in response.json()["fields"]
    assert not MemoryRequest.objects.exists()


def test_missing_user_id_is_400(api) -> None:
    response = api.post("/v1/memories", JOB, format="json")
    assert response.status_code == 400 and "user_id" in response.json()["fields"]


def test_malformed_json_is_400(api) -> None:
    response = api.post("/v1/memories", data="{not json", content_type="application/json")
    assert response.status_code == 400 and "body" in response.json()["fields"]


def _job_body_with(user_id, metadata_json: str) -> str:
    """A job's body whose metadata is `metadata_json`, as raw text: what json.dumps cannot write."""
    body = json.dumps({"user_id": str(user_id), **JOB, "metadata": "METADATA"})
    return body.replace('"METADATA"', metadata_json)


@pytest.mark.parametrize(
    "metadata_json",
    ['{"n": 1e400}', '{"n": NaN}', "[" * 100_000 + "]" * 100_000],
    ids=["number-beyond-a-double", "nan", "nested-100000-deep"],
)
def test_json_no_column_can_hold_is_400_naming_the_body(api, end_user, metadata_json) -> None:
    response = api.post(
        "/v1/memories",
        data=_job_body_with(end_user.id, metadata_json),
        content_type="application/json",
    )
    assert response.status_code == 400 and "body" in response.json()["fields"]
    assert not MemoryRequest.objects.exists()


def test_an_error_quoting_a_lone_surrogate_is_a_400_in_valid_json(api, end_user) -> None:
    body = {"user_id": str(end_user.id), **JOB, "priority": "\ud800"}
    response = api.post("/v1/memories", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert "priority" in json.loads(response.content)["fields"]
    assert b"\\ud800" in response.content  # escaped: it has no UTF-8 form


def test_the_json_renderer_writes_the_values_drf_writes() -> None:
    # orjson encodes the API's bodies; each value must read back as DRF's renderer wrote it
    # (dates cut to milliseconds with `Z`, decimals as floats, lazy text, enums, subclasses), and
    # what orjson refuses (a 65-bit integer, an integer key) still goes out.
    from datetime import UTC, date, datetime
    from datetime import time as clock
    from decimal import Decimal

    from django.utils.translation import gettext_lazy
    from rest_framework.exceptions import ErrorDetail
    from rest_framework.renderers import JSONRenderer as DrfJSONRenderer
    from rest_framework.utils.serializer_helpers import ReturnDict

    from memories.renderers import JSONRenderer

    data = {
        "when": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "naive": datetime(2026, 1, 2, 3, 4, 5, 6000),
        "day": date(2026, 1, 2),
        "clock": clock(3, 4, 5, 987654),
        "span": timedelta(seconds=90),
        "price": Decimal("1.10"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "lazy": gettext_lazy("Not found."),
        "detail": ErrorDetail("bad", code="invalid"),
        "nested": ReturnDict({"a": [1, 2.5, 1e-07, 0.1 + 0.2, None, True]}, serializer=None),
        "type": Memory.Type.FACT,
        "text": "line\u2028para\u2029 é 日本 \x00",
    }
    for value in (data, {"big": 2**70}, {1: "an integer key"}, [], None):
        ours, drfs = JSONRenderer().render(value), DrfJSONRenderer().render(value)
        assert (json.loads(ours) if ours else None) == (json.loads(drfs) if drfs else None)
    assert b"\\u2028" in JSONRenderer().render(data)  # escaped as DRF does: a JavaScript subset
    pretty = "application/json; indent=4"
    assert JSONRenderer().render(data, pretty) == DrfJSONRenderer().render(data, pretty)


def test_json_that_is_not_an_object_is_400(api) -> None:
    response = api.post("/v1/memories", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400 and "body" in response.json()["fields"]


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=2_000)
def test_body_over_the_limit_is_400(api, end_user) -> None:
    body = {"user_id": str(end_user.id), "messages": [{"role": "user", "content": "x" * 5_000}]}
    response = api.post("/v1/memories", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and "body" in response.json()["fields"]
    assert not MemoryRequest.objects.exists()


def test_malformed_uuid_in_path_is_404(api) -> None:
    assert api.get("/v1/requests/not-a-uuid").status_code == 404
    assert api.get("/v1/memories/123/history").status_code == 404


def test_request_of_another_tenant_is_404(api, other_api, end_user) -> None:
    request_id = submit(api, end_user.id).json()["request_id"]
    assert other_api.get(f"/v1/requests/{request_id}").status_code == 404


# --- Memories ------------------------------------------------------------------------------------


@pytest.fixture
def memory(end_user) -> Memory:
    from memories.providers.wiring import get_embedder

    return Memory.objects.create(
        tenant=end_user.tenant,
        user=end_user,
        content="Lives in Paris",
        embedding=get_embedder().embed(["Lives in Paris"])[0],
        content_hash="h",
    )


def test_get_memory(api, memory) -> None:
    response = api.get(f"/v1/memories/{memory.id}")
    assert response.status_code == 200
    assert response.json()["content"] == "Lives in Paris" and response["ETag"] == '"1"'


def test_memory_of_another_tenant_is_404(other_api, memory) -> None:
    assert other_api.get(f"/v1/memories/{memory.id}").status_code == 404
    assert (
        other_api.patch(f"/v1/memories/{memory.id}", {"content": "x"}, format="json").status_code
        == 404
    )
    assert other_api.delete(f"/v1/memories/{memory.id}").status_code == 404
    memory.refresh_from_db()
    assert memory.content == "Lives in Paris" and memory.deleted_at is None


def test_patch_corrects_a_memory_and_records_history(api, memory) -> None:
    response = api.patch(f"/v1/memories/{memory.id}", {"content": "Lives in Rome"}, format="json")
    assert response.status_code == 200
    assert response.json()["version"] == 2
    history = api.get(f"/v1/memories/{memory.id}/history").json()["history"]
    assert [(h["event"], h["old_content"], h["new_content"]) for h in history] == [
        ("UPDATE", "Lives in Paris", "Lives in Rome")
    ]
    search = api.post(
        "/v1/memories/search", {"user_id": str(memory.user_id), "query": "Rome"}, format="json"
    ).json()["results"]
    assert search[0]["content"] == "Lives in Rome"


@pytest.mark.parametrize("method", ["patch", "delete"])
def test_a_correction_or_a_delete_reads_the_memory_once_under_its_row_lock(
    api, memory, method
) -> None:
    api.get(f"/v1/memories/{memory.id}")  # the key read and cached, as on any later call
    with CaptureQueriesContext(connection) as queries:
        if method == "patch":
            response = api.patch(f"/v1/memories/{memory.id}", {"content": "x"}, format="json")
        else:
            response = api.delete(f"/v1/memories/{memory.id}")
    assert response.status_code in (200, 204)
    reads = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith("SELECT")
        and re.search(r"\bmemories_memory\b", q["sql"])  # the table, not memories_memoryrequest
    ]
    assert len(reads) == 1 and reads[0].rstrip().endswith("FOR UPDATE"), reads


def test_patch_of_metadata_alone_keeps_content_and_embedding(api, memory) -> None:
    embedding_before = list(Memory.objects.get(pk=memory.pk).embedding)
    response = api.patch(
        f"/v1/memories/{memory.id}", {"metadata": {"city": "Paris"}}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["version"] == 2 and response.json()["metadata"] == {"city": "Paris"}
    stored = Memory.objects.get(pk=memory.pk)
    assert stored.content == "Lives in Paris"
    assert list(stored.embedding) == embedding_before


def test_patch_with_stale_if_match_is_412_and_changes_nothing(api, memory) -> None:
    api.patch(f"/v1/memories/{memory.id}", {"content": "Lives in Rome"}, format="json")
    response = api.patch(
        f"/v1/memories/{memory.id}",
        {"content": "Lives in Oslo"},
        format="json",
        HTTP_IF_MATCH='"1"',
    )
    assert response.status_code == 412
    memory.refresh_from_db()
    assert memory.content == "Lives in Rome"


def test_patch_with_current_if_match_succeeds(api, memory) -> None:
    response = api.patch(
        f"/v1/memories/{memory.id}",
        {"content": "Lives in Oslo"},
        format="json",
        HTTP_IF_MATCH='"1"',
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "if_match",
    ['"²"', '"one"', '""', '"-1"', '"' + "9" * 5000 + '"'],
    ids=["superscript-two", "word", "empty", "negative", "5000-digits"],
)
def test_patch_with_an_if_match_that_is_no_version_is_400_naming_it(api, memory, if_match):
    response = api.patch(
        f"/v1/memories/{memory.id}",
        {"content": "Lives in Oslo"},
        format="json",
        HTTP_IF_MATCH=if_match,
    )
    assert response.status_code == 400 and "If-Match" in response.json()["fields"]
    memory.refresh_from_db()
    assert memory.content == "Lives in Paris" and memory.version == 1


@pytest.mark.parametrize(("provider_status", "retry_after"), [(503, True), (400, False)])
def test_a_correction_the_embedding_provider_fails_is_502_and_changes_nothing(
    api, memory, openai_settings, settings, provider_status, retry_after
) -> None:
    settings.LLM_CLIENT_MAX_RETRIES = 0
    openai_settings.fail_next(1, status=provider_status)
    response = api.patch(f"/v1/memories/{memory.id}", {"content": "Lives in Oslo"}, format="json")
    assert response.status_code == 502 and response.json()["error"] == "provider_unavailable"
    # Worth trying again after a 503; a refusal (400: a bad key, an unknown model) is not.
    assert ("Retry-After" in response) is retry_after
    assert "127.0.0.1" not in response.content.decode()  # the provider's address stays inside
    memory.refresh_from_db()
    assert memory.content == "Lives in Paris" and memory.version == 1
    assert not MemoryHistory.objects.filter(memory=memory).exists()


def test_patch_with_nothing_to_change_is_400(api, memory) -> None:
    response = api.patch(f"/v1/memories/{memory.id}", {}, format="json")
    assert response.status_code == 400 and "content" in response.json()["fields"]


def test_delete_forgets_the_memory_leaving_a_content_free_tombstone_and_history(
    api, memory
) -> None:
    assert api.delete(f"/v1/memories/{memory.id}").status_code == 204
    assert api.get(f"/v1/memories/{memory.id}").status_code == 404
    history = api.get(f"/v1/memories/{memory.id}/history").json()["history"]
    assert [h["event"] for h in history][-1] == "DELETE"
    assert all(h["old_content"] is None and h["new_content"] is None for h in history)
    tombstone = Memory.objects.get(pk=memory.id)
    assert (tombstone.content, tombstone.metadata, tombstone.embedding) == ("", {}, None)
    assert tombstone.deleted_at is not None and tombstone.version == memory.version + 1


def test_list_memories_paginates_with_a_cursor(api, end_user) -> None:
    from memories.providers.wiring import get_embedder

    texts = [f"Fact number {i}" for i in range(5)]
    for text, vector in zip(texts, get_embedder().embed(texts), strict=True):
        Memory.objects.create(
            tenant=end_user.tenant, user=end_user, content=text, embedding=vector, content_hash=text
        )
    seen: list[str] = []
    cursor = None
    while True:
        params = {"user_id": str(end_user.id), "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/memories", params).json()
        seen += [m["content"] for m in page["results"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(texts) and len(seen) == 5


@pytest.mark.parametrize(
    "query",
    [
        {"metadata": '{"a": NaN}'},
        {"metadata": '{"a": 1e400}'},
        {"metadata": "[" * 5000 + "]" * 5000},
        {"cursor": "W1s" * 100},
    ],
    ids=["nan", "beyond-a-double", "nested-5000-deep", "cursor-too-long"],
)
def test_list_with_json_in_a_query_no_column_can_hold_is_400(api, end_user, query) -> None:
    response = api.get("/v1/memories", {"user_id": str(end_user.id), **query})
    assert response.status_code == 400, response.content[:200]
    assert set(response.json()["fields"]) == set(query)


def test_list_with_malformed_cursor_is_400(api, end_user) -> None:
    response = api.get("/v1/memories", {"user_id": str(end_user.id), "cursor": "%%%"})
    assert response.status_code == 400 and "cursor" in response.json()["fields"]


def test_unknown_path_is_a_json_404(api) -> None:
    response = api.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_health_and_readiness_need_no_key_and_report_both_services(db) -> None:
    client = APIClient()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "broker": "ok"}


# --- Text PostgreSQL cannot store ----------------------------------------------------------------

NUL_METADATA = {"note": "a\x00b", "nested": [{"k\x00": 1}]}


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"note": "a\x00b"}, "Null characters are not allowed."),
        ({"nested": [{"k\x00": 1}]}, "Null characters are not allowed."),
        ({"note": "lone \ud800 surrogate"}, "Surrogate characters are not allowed: U+D800."),
    ],
)
def test_unstorable_text_in_job_metadata_is_400_naming_it(api, end_user, metadata, problem):
    body = {
        "user_id": str(end_user.id),
        "messages": [{"role": "user", "content": "I like tea."}],
        "metadata": metadata,
    }
    # As a client would send it: ASCII JSON, a lone surrogate as its \u escape.
    response = api.post("/v1/memories", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["fields"] == {"metadata": [problem]}
    assert not MemoryRequest.objects.exists()


def test_a_null_character_in_user_or_memory_metadata_is_400_and_changes_nothing(
    api, end_user
) -> None:
    response = api.post("/v1/users", {"metadata": NUL_METADATA}, format="json")
    assert response.status_code == 400 and "metadata" in response.json()["fields"]
    (memory,) = store_memories(end_user, "Likes tea", metadata={"kept": True})
    response = api.patch(f"/v1/memories/{memory.id}", {"metadata": NUL_METADATA}, format="json")
    assert response.status_code == 400 and "metadata" in response.json()["fields"]
    memory.refresh_from_db()
    assert (memory.metadata, memory.version) == ({"kept": True}, 1)
    search = {"user_id": str(end_user.id), "query": "tea", "filters": {"metadata": NUL_METADATA}}
    response = api.post("/v1/memories/search", search, format="json")
    assert response.status_code == 400 and "filters.metadata" in response.json()["fields"]


# --- Input serializers used again ----------------------------------------------------------------


def test_a_reused_input_serializer_keeps_nothing_from_the_call_before() -> None:
    from rest_framework.exceptions import ValidationError

    from memories.api import MemoryCollectionApi, validated_input

    serializer_class = MemoryCollectionApi.InputSerializer
    user_id = str(uuid.uuid4())
    first = validated_input(
        serializer_class,
        {
            "user_id": user_id,
            "messages": [{"role": "user", "content": "one"}],
            "metadata": {"a": 1},
        },
    )
    with pytest.raises(ValidationError) as bad:
        validated_input(serializer_class, {"user_id": "nope", "messages": []})
    assert set(bad.value.detail) == {"user_id", "messages"}
    second = validated_input(
        serializer_class, {"user_id": user_id, "messages": [{"role": "user", "content": "two"}]}
    )
    # Defaults are fresh per call, and the first call's result is left as it was.
    assert second["metadata"] == {} and second["messages"] == [{"role": "user", "content": "two"}]
    assert first["metadata"] == {"a": 1} and first["messages"][0]["content"] == "one"
    assert second["metadata"] is not first["metadata"]


def test_input_serializers_are_not_shared_between_threads() -> None:
    import sys
    import threading

    from memories.api import MemoryCollectionApi, validated_input

    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def validate(n: int) -> None:
        body = {"user_id": str(uuid.uuid4()), "messages": [{"role": "user", "content": f"m{n}"}]}
        barrier.wait(timeout=10)  # all four threads validate at the same time
        for _ in range(200):
            data = validated_input(MemoryCollectionApi.InputSerializer, body)
            assert data["messages"][0]["content"] == f"m{n}"
        results[n] = data["messages"][0]["content"]

    # Switch threads every few bytecodes, so that a serializer shared between them would see
    # another thread's data in the middle of a validation.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=validate, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(timeout=30)
    finally:
        sys.setswitchinterval(previous)
    assert results == {n: f"m{n}" for n in range(4)}


def test_a_correction_of_a_memory_id_that_is_not_a_uuid_is_not_found(tenant) -> None:
    from memories.errors import NotFound
    from memories.providers.wiring import get_embedder

    with pytest.raises(NotFound):
        memory_writes.memory_update(
            tenant_id=tenant.id, memory_id="not-a-uuid", embedder=get_embedder(), content="x"
        )
    with pytest.raises(NotFound):
        erasure.memory_forget(tenant_id=tenant.id, memory_id="not-a-uuid")


@pytest.mark.parametrize("depth", [65, 900], ids=["just-too-deep", "deep-enough-to-crash-encoders"])
def test_metadata_nested_too_deep_is_400_naming_it_everywhere(api, end_user, memory, depth):
    from memories.validation import MAX_JSON_DEPTH

    assert depth > MAX_JSON_DEPTH
    nested = "[" * depth + "]" * depth

    def body(document: dict) -> str:
        return json.dumps(document).replace('"NESTED"', nested)

    uid = str(end_user.id)
    job = api.post(
        "/v1/memories",
        data=body({"user_id": uid, **JOB, "metadata": {"k": "NESTED"}}),
        content_type="application/json",
    )
    assert job.status_code == 400 and "metadata" in job.json()["fields"]
    patch = api.patch(
        f"/v1/memories/{memory.id}",
        data=body({"metadata": {"k": "NESTED"}}),
        content_type="application/json",
    )
    assert patch.status_code == 400 and "metadata" in patch.json()["fields"]
    item = {"user_id": uid, "content": "Likes tea", "metadata": {"k": "NESTED"}}
    sync_batch = api.post(
        "/v1/memories/batch", data=body({"items": [item]}), content_type="application/json"
    )
    assert sync_batch.status_code == 200
    assert sync_batch.json()["results"][0]["error"]["field"] == "metadata"
    async_batch = api.post(
        "/v1/memories/batch",
        data=body({"items": [item], "async": True}),
        content_type="application/json",
    )
    assert async_batch.status_code == 400 and "items" in async_batch.json()["fields"]
    assert not MemoryRequest.objects.exists()
    memory.refresh_from_db()
    assert memory.version == 1 and Memory.objects.count() == 1


def test_metadata_nested_as_deep_as_allowed_is_stored(api, end_user) -> None:
    from memories.validation import MAX_JSON_DEPTH

    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    body = json.dumps({"user_id": str(end_user.id), **JOB, "metadata": {"k": "N"}})
    response = api.post(
        "/v1/memories", data=body.replace('"N"', nested), content_type="application/json"
    )
    assert response.status_code == 202, response.content
