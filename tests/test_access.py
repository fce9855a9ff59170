"""Key roles and grants (memories.access) over every endpoint: another tenant's key sees only
404 (or its own tenant's data), a read-only key cannot write, an agent key needs its grants, and
one with them gets through. The matrix is checked against the URLconf, so a new endpoint without
an entry fails here."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.test import APIClient

from memories import accounts, events, ledger, memory_writes, sessions
from memories.audit import audit_record
from memories.models import (
    ApiKey,
    EndUser,
    Memory,
    MemoryConflict,
    MemoryHistory,
    MemoryRequest,
    OutboxEvent,
    Tenant,
)
from memories.providers.wiring import get_embedder
from tests.live_server import uvicorn_live_server
from webhooks import services as webhook_services

# --- The world every call is made against ---------------------------------------------------------


@dataclass
class World:
    tenant: Tenant
    user: EndUser
    memory: Memory
    session_id: str
    request_id: str
    webhook_id: str
    key_id: str
    conflict_id: str

    @property
    def user_id(self) -> str:
        return str(self.user.id)

    def path_kwargs(self) -> dict[str, str]:
        return {
            "user_id": self.user_id,
            "memory_id": str(self.memory.id),
            "session_id": self.session_id,
            "request_id": self.request_id,
            "webhook_id": self.webhook_id,
            "key_id": self.key_id,
            "conflict_id": self.conflict_id,
        }

    def secrets(self) -> list[str]:
        """What another tenant must never see of this one."""
        return [
            self.memory.content,
            str(self.memory.id),
            self.session_id,
            self.request_id,
            self.webhook_id,
            self.key_id,
            self.conflict_id,
        ]


def memory_make(user: EndUser | None, content: str, *, tenant: Tenant, **fields: Any) -> Memory:
    return Memory.objects.create(
        tenant=tenant,
        user=user,
        content=content,
        embedding=get_embedder().embed([content])[0],
        content_hash=memory_writes.content_hash(content),
        **fields,
    )


@pytest.fixture
def world(tenant: Tenant) -> World:
    user = accounts.end_user_create(tenant=tenant, external_id="alice")
    memory = memory_make(user, "the secret fact: likes tea", tenant=tenant)
    session = sessions.session_start(user=user, agent_id="", metadata={})
    memory_request = ledger.memory_request_submit(
        tenant_id=tenant.id,
        user_id=user.id,
        payload={"messages": [{"role": "user", "content": "hello"}], "metadata": {}},
    )
    webhook = webhook_services.webhook_create(
        tenant=tenant, url="https://hooks.example.com/in", event_types=[], channels=[]
    )
    spare_key, _ = accounts.api_key_create(tenant=tenant, name="spare")
    conflict = MemoryConflict.objects.create(
        tenant=tenant,
        memory=memory,
        current={"content": memory.content, "version": 1, "clock": {}, "agent_id": ""},
        incoming={"content": "the rival fact", "version": 1, "clock": {"b": 1}, "agent_id": "b"},
    )
    return World(
        tenant=tenant,
        user=user,
        memory=memory,
        session_id=str(session.id),
        request_id=str(memory_request.id),
        webhook_id=str(webhook.id),
        key_id=str(spare_key.id),
        conflict_id=str(conflict.id),
    )


def client_for(tenant: Tenant, role: str = "admin", grants: list[str] | None = None) -> APIClient:
    _, raw_key = accounts.api_key_create(tenant=tenant, name=role, role=role, grants=grants)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


# --- The matrix: every (route name, method) and what it needs ------------------------------------


@dataclass(frozen=True)
class Call:
    # "user": a grant of the world's user; "admin": an admin key; "create": any role that
    # writes; "any": every role.
    need: str
    write: bool = False
    # The JSON body (POST, PATCH) or the query (GET, DELETE), from the world.
    data: Callable[[World], dict[str, Any]] = field(default=lambda w: {})


def _messages(w: World) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}]}


MATRIX: dict[tuple[str, str], Call] = {
    ("user-create", "post"): Call("create", True, lambda w: {"external_id": "bob"}),
    ("user-create-alias", "post"): Call("create", True, lambda w: {"external_id": "bob"}),
    ("user-detail", "get"): Call("user"),
    ("user-detail", "delete"): Call("user", True),
    ("memories", "post"): Call("user", True, lambda w: {"user_id": w.user_id, **_messages(w)}),
    ("memories", "get"): Call("user", False, lambda w: {"user_id": w.user_id}),
    ("memory-search", "post"): Call("user", False, lambda w: {"user_id": w.user_id, "query": "x"}),
    ("memory-batch", "post"): Call(
        "user",
        True,
        lambda w: {
            "items": [
                {"user_id": w.user_id, "content": "c", "type": "fact", "metadata": {}},
            ]
        },
    ),
    ("memory-detail", "get"): Call("user"),
    ("memory-detail", "patch"): Call("user", True, lambda w: {"content": "changed"}),
    ("memory-detail", "delete"): Call("user", True),
    ("memory-history", "get"): Call("user"),
    ("requests", "get"): Call("admin"),  # every user's requests
    ("request", "get"): Call("user"),
    ("request-alias", "get"): Call("user"),
    ("sessions", "post"): Call("user", True, lambda w: {"user_id": w.user_id}),
    ("session-messages", "post"): Call("user", True, _messages),
    ("session-end", "post"): Call("user", True),
    ("session-timeline", "get"): Call("user"),
    ("session-reconstruct", "get"): Call("user"),
    ("events", "get"): Call("admin"),  # the whole tenant's events
    ("analytics", "get"): Call("admin"),
    ("sync", "get"): Call("user", False, lambda w: {"user_id": w.user_id}),
    ("keys", "post"): Call("admin", True, lambda w: {"name": "k", "role": "agent"}),
    ("keys", "get"): Call("admin"),
    ("key-detail", "delete"): Call("admin", True),
    ("whoami", "get"): Call("any"),
    ("audit", "get"): Call("admin"),
    ("webhooks", "post"): Call("admin", True, lambda w: {"url": "https://hooks.example.com/x"}),
    ("webhooks", "get"): Call("admin"),
    ("webhook-detail", "delete"): Call("admin", True),
    ("webhook-deliveries", "get"): Call("admin"),
    ("user-create", "get"): Call("user", False, lambda w: {"external_id": "alice"}),
    ("user-create-alias", "get"): Call("user", False, lambda w: {"external_id": "alice"}),
    ("memory-direct", "post"): Call("user", True, lambda w: {"user_id": w.user_id, "content": "c"}),
    ("conflicts", "get"): Call("admin"),  # every memory's conflicts
    ("conflict-resolve", "post"): Call("user", True, lambda w: {"choose": "incoming"}),
    ("sync-digest", "get"): Call("user", False, lambda w: {"user_id": w.user_id}),
    ("session", "get"): Call("user"),
    ("session-messages", "get"): Call("user"),
}

# Calls of a route already in the matrix whose rule depends on a parameter.
VARIANTS: list[tuple[str, str, Call]] = [
    ("requests", "get", Call("user", False, lambda w: {"user_id": w.user_id})),
    ("events", "get", Call("user", False, lambda w: {"user_id": w.user_id})),
    ("conflicts", "get", Call("user", False, lambda w: {"memory_id": str(w.memory.id)})),
]

# Not the API's: health, metrics (their own token), and the WSGI stand-in for the SSE endpoint
# (its channels are checked in test_stream_* below).
# The published contract and its Swagger UI are public (tests/test_openapi.py).
EXEMPT = {
    "healthz",
    "metrics",
    "readyz",
    "stream-needs-asgi",
    "openapi-schema",
    "openapi-docs",
    "openapi-assets",
}

CASES = [(name, method, call) for (name, method), call in MATRIX.items()] + VARIANTS
CASE_IDS = [f"{name}-{method}-{i}" for i, (name, method, _) in enumerate(CASES)]


def _routes(patterns: list[Any]) -> Iterator[tuple[str, Any]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            if str(pattern.pattern).startswith(("admin/", "dashboard/")):
                continue  # the Django admin and the dashboard: staff sessions, not API keys
            yield from _routes(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            yield pattern.name, pattern.callback


def _endpoints() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for name, callback in _routes(get_resolver().url_patterns):
        view_class = getattr(callback, "view_class", None)
        if name in EXEMPT:
            continue
        assert view_class is not None, f"{name}: a function view needs a matrix entry or EXEMPT"
        for method in view_class.http_method_names:
            if method not in ("options", "head") and hasattr(view_class, method):
                found.add((name, method))
    return found


def test_every_endpoint_has_a_matrix_entry() -> None:
    endpoints = _endpoints()
    assert endpoints - set(MATRIX) == set(), "endpoints without a role-matrix entry"
    assert set(MATRIX) - endpoints == set(), "matrix entries of no endpoint"


def call(client: APIClient, world: World, name: str, method: str, spec: Call) -> Any:
    pattern = next(p for p in _all_patterns(get_resolver().url_patterns) if p.name == name)
    converters = getattr(pattern.pattern, "converters", {})
    kwargs = {key: value for key, value in world.path_kwargs().items() if key in converters}
    url = reverse(name, kwargs=kwargs)
    if method in ("get", "delete"):
        return getattr(client, method)(url, spec.data(world))
    return getattr(client, method)(url, spec.data(world), format="json")


def _all_patterns(patterns: list[Any]) -> Iterator[URLPattern]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _all_patterns(pattern.url_patterns)
        else:
            yield pattern


def _forbidden(response: Any) -> str | None:
    """The missing grant of a 403, None for any other answer."""
    if response.status_code != 403:
        return None
    body = response.json()
    assert body["error"] == "forbidden", body
    return body["missing_grant"]


@pytest.mark.parametrize(("name", "method", "spec"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("role", ["admin", "agent"])
def test_another_tenants_key_gets_404_or_only_its_own(
    world: World, other_tenant: Tenant, name: str, method: str, spec: Call, role: str
) -> None:
    client = client_for(other_tenant, role, ["*", "shared:write"] if role == "agent" else [])
    response = call(client, world, name, method, spec)
    if response.status_code in (403, 404):
        assert response.status_code == 404 or spec.need == "admin", response.content
        return
    assert response.status_code < 500, response.content
    body = response.content.decode()
    leaked = [secret for secret in world.secrets() if secret in body]
    assert not leaked, f"{name} {method} showed another tenant {leaked}"


@pytest.mark.parametrize(("name", "method", "spec"), CASES, ids=CASE_IDS)
def test_read_only_key_never_writes(
    world: World, name: str, method: str, spec: Call, settings
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0
    response = call(client_for(world.tenant, "read-only", ["*"]), world, name, method, spec)
    missing = _forbidden(response)
    if spec.need == "admin":
        assert missing == "role:admin", response.content
    elif spec.write:
        assert missing == "role:agent", response.content
    else:
        assert missing is None, response.content
        assert response.status_code < 500, response.content


@pytest.mark.parametrize(("name", "method", "spec"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("role", ["agent", "read-only"])
def test_key_without_the_grant_is_403_naming_it(
    world: World, name: str, method: str, spec: Call, role: str
) -> None:
    response = call(client_for(world.tenant, role, ["topic:other"]), world, name, method, spec)
    missing = _forbidden(response)
    if spec.need == "admin":
        assert missing == "role:admin", response.content
    elif role == "read-only" and spec.write:
        assert missing == "role:agent", response.content
    elif spec.need == "user":
        assert missing == f"user:{world.user_id}", response.content
    else:
        assert missing is None, response.content


@pytest.mark.parametrize(("name", "method", "spec"), CASES, ids=CASE_IDS)
def test_agent_with_the_grant_gets_through(
    world: World, name: str, method: str, spec: Call
) -> None:
    response = call(
        client_for(world.tenant, "agent", [f"user:{world.user_id}"]), world, name, method, spec
    )
    if spec.need == "admin":
        assert _forbidden(response) == "role:admin", response.content
    else:
        assert response.status_code < 400, response.content


@pytest.mark.parametrize(("name", "method", "spec"), CASES, ids=CASE_IDS)
def test_admin_gets_through(world: World, name: str, method: str, spec: Call) -> None:
    response = call(client_for(world.tenant), world, name, method, spec)
    assert response.status_code < 400 or name == "webhooks", response.content


# --- Users an agent creates, shared and topic memories ------------------------------------------


def test_agent_uses_the_users_it_creates_and_no_other_agent_does(tenant: Tenant) -> None:
    agent, stranger = client_for(tenant, "agent"), client_for(tenant, "agent")
    created = agent.post("/v1/users", {"external_id": "carol"}, format="json")
    assert created.status_code == 201
    user_id = created.json()["user_id"]
    assert agent.get(f"/v1/users/{user_id}").status_code == 200
    assert agent.get("/v1/memories", {"user_id": user_id}).status_code == 200
    refused = stranger.get(f"/v1/users/{user_id}")
    assert refused.status_code == 403
    assert refused.json()["missing_grant"] == f"user:{user_id}"


def test_shared_memories_are_read_by_all_and_written_with_shared_write(tenant: Tenant) -> None:
    shared = memory_make(None, "office closes at 6", tenant=tenant, scope="tenant")
    reader, writer = client_for(tenant, "agent"), client_for(tenant, "agent", ["shared:write"])
    assert reader.get(f"/v1/memories/{shared.id}").status_code == 200
    refused = reader.patch(f"/v1/memories/{shared.id}", {"content": "at 7"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["missing_grant"] == "shared:write"
    assert client_for(tenant, "read-only").get(f"/v1/memories/{shared.id}").status_code == 200
    changed = writer.patch(f"/v1/memories/{shared.id}", {"content": "at 7"}, format="json")
    assert changed.status_code == 200, changed.content


def test_topic_memories_need_the_topic_grant(tenant: Tenant) -> None:
    memory = memory_make(None, "release on friday", tenant=tenant, scope="topic", topic="news")
    refused = client_for(tenant, "agent", ["topic:sport"]).get(f"/v1/memories/{memory.id}")
    assert refused.status_code == 403
    assert refused.json()["missing_grant"] == "topic:news"
    granted = client_for(tenant, "read-only", ["topic:news"])
    assert granted.get(f"/v1/memories/{memory.id}").status_code == 200
    assert granted.delete(f"/v1/memories/{memory.id}").json()["missing_grant"] == "role:agent"


def test_batch_with_an_ungranted_user_is_refused_whole(world: World, tenant: Tenant) -> None:
    other = accounts.end_user_create(tenant=tenant, external_id="dave")
    agent = client_for(tenant, "agent", [f"user:{world.user_id}"])
    item = {"content": "c", "type": "fact", "metadata": {}}
    body = {"items": [{**item, "user_id": world.user_id}, {**item, "user_id": str(other.id)}]}
    refused = agent.post("/v1/memories/batch", body, format="json")
    assert refused.status_code == 403
    assert refused.json()["missing_grant"] == f"user:{other.id}"
    assert Memory.objects.filter(tenant=tenant, content="c").count() == 0


# --- Keys: the command, the API, whoami ----------------------------------------------------------


def test_createapikey_takes_a_role_and_grants(tenant: Tenant) -> None:
    out = io.StringIO()
    call_command(
        "createapikey",
        "--tenant",
        tenant.name,
        "--role",
        "agent",
        "--grant",
        "topic:news",
        "--grant",
        "shared:write",
        stdout=out,
        stderr=io.StringIO(),
    )
    raw_key = out.getvalue().strip().splitlines()[-1]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    me = client.get("/v1/whoami").json()
    assert me["role"] == "agent"
    assert me["grants"] == ["shared:write", "topic:news"]
    assert me["tenant_id"] == str(tenant.id)


def test_createapikey_without_a_role_makes_an_admin(db) -> None:
    out = io.StringIO()
    call_command("createapikey", "--tenant", "fresh", stdout=out, stderr=io.StringIO())
    assert ApiKey.objects.get(tenant__name="fresh").role == "admin"


def test_createapikey_refuses_a_bad_grant_and_makes_nothing(db) -> None:
    with pytest.raises(CommandError, match="grant"):
        call_command(
            "createapikey", "--tenant", "never", "--grant", "user:not-a-uuid", stderr=io.StringIO()
        )
    assert not Tenant.objects.filter(name="never").exists()


def test_keys_api_creates_lists_and_revokes(api: APIClient, tenant: Tenant, end_user) -> None:
    created = api.post(
        "/v1/keys",
        {"name": "bot", "role": "agent", "grants": [f"user:{str(end_user.id).upper()}"]},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["role"] == "agent"
    assert body["grants"] == [f"user:{end_user.id}"]  # canonical
    bot = APIClient()
    bot.credentials(HTTP_AUTHORIZATION=f"Bearer {body['key']}")
    assert bot.get("/v1/whoami").json()["key_id"] == body["id"]
    assert bot.get(f"/v1/users/{end_user.id}").status_code == 200

    listed = api.get("/v1/keys").json()["results"]
    assert body["id"] in [k["id"] for k in listed]
    assert all("key" not in k and "key_hash" not in k for k in listed)

    assert api.delete(f"/v1/keys/{body['id']}").status_code == 204
    assert bot.get("/v1/whoami").status_code == 401
    revoked = next(k for k in api.get("/v1/keys").json()["results"] if k["id"] == body["id"])
    assert revoked["revoked_at"] is not None


@pytest.mark.parametrize("grants", [["user:42"], ["everything"], "*", [7], ["topic:"]])
def test_a_bad_grant_is_400_naming_grants(api: APIClient, grants: Any) -> None:
    response = api.post("/v1/keys", {"name": "x", "role": "agent", "grants": grants}, format="json")
    assert response.status_code == 400, response.content
    assert "grants" in response.json()["fields"]


def test_a_key_of_another_tenant_is_not_found(api: APIClient, other_tenant: Tenant) -> None:
    theirs, _ = accounts.api_key_create(tenant=other_tenant)
    assert api.delete(f"/v1/keys/{theirs.id}").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# --- Actors: history, events, audit -------------------------------------------------------------


def test_patch_and_delete_record_the_key_and_agent(world: World, tenant: Tenant) -> None:
    client = client_for(tenant)
    key_id = client.get("/v1/whoami").json()["key_id"]
    memory_id = world.memory.id
    response = client.patch(
        f"/v1/memories/{memory_id}", {"content": "likes coffee"}, format="json",
        HTTP_X_AGENT_ID="support-bot",
    )  # fmt: skip
    assert response.status_code == 200
    entry = MemoryHistory.objects.filter(memory_id=memory_id).order_by("-id").first()
    assert entry is not None
    assert (entry.actor, str(entry.actor_key_id)) == ("support-bot", key_id)
    history = client.get(f"/v1/memories/{memory_id}/history").json()["history"]
    assert history[-1]["actor_key_id"] == key_id

    updated = OutboxEvent.objects.filter(event_type="memory.updated").get()
    assert updated.payload["source"]["api_key_id"] == key_id

    assert client.delete(f"/v1/memories/{memory_id}").status_code == 204
    deleted = OutboxEvent.objects.filter(event_type="memory.deleted").get()
    assert deleted.payload["source"]["api_key_id"] == key_id


def test_a_memory_job_records_its_key(world: World, tenant: Tenant) -> None:
    client = client_for(tenant)
    key_id = client.get("/v1/whoami").json()["key_id"]
    body = {"user_id": world.user_id, "messages": [{"role": "user", "content": "I am 40"}]}
    request_id = client.post("/v1/memories", body, format="json").json()["request_id"]

    assert MemoryRequest.objects.get(pk=request_id).payload["api_key_id"] == key_id


def test_audit_pages_newest_first_with_actors(world: World, tenant: Tenant, other_tenant) -> None:
    api = client_for(tenant)
    for n in range(5):
        event = events.memory_event(world.memory, "memory.updated", api_key_id=world.key_id)
        event["source"]["agent_id"] = f"agent-{n}"
        audit_record(f"1-{n}", event)
    theirs = memory_make(None, "x", tenant=other_tenant, scope="tenant")
    audit_record("2-0", events.memory_event(theirs, "memory.created"))

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/audit", params).json()
        seen += page["results"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["actor"]["agent_id"] for e in seen] == [f"agent-{n}" for n in range(4, -1, -1)]
    assert {e["actor"]["key_id"] for e in seen} == {world.key_id}
    assert {e["memory_id"] for e in seen} == {str(world.memory.id)}
    assert api.get("/v1/audit", {"memory_id": str(theirs.id)}).json()["results"] == []
    filtered = api.get("/v1/audit", {"user_id": world.user_id, "limit": 500}).json()
    assert len(filtered["results"]) == 5
    assert api.get("/v1/audit", {"cursor": "!!"}).status_code == 400


# --- The SSE endpoint's channels ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_live_server() as base_url:
        yield base_url


def _stream_status(base_url: str, key: str, channels: str) -> tuple[int, dict[str, Any]]:
    with httpx.stream(
        "GET",
        f"{base_url}/v1/stream",
        params={"channels": channels},
        headers={"Authorization": f"Bearer {key}"},
        timeout=5.0,
    ) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(response.read())
        return 200, {}


@pytest.mark.django_db(transaction=True)
def test_stream_user_channel_needs_the_user_grant(server: str, tenant: Tenant) -> None:
    user = accounts.end_user_create(tenant=tenant, external_id="erin")
    _, ungranted = accounts.api_key_create(tenant=tenant, role="agent", grants=["topic:x"])
    _, granted = accounts.api_key_create(
        tenant=tenant, role="read-only", grants=[f"user:{user.id}"]
    )
    status, body = _stream_status(server, ungranted, f"user:{user.id}:memories")
    assert status == 403
    assert body["missing_grant"] == f"user:{user.id}"
    assert _stream_status(server, granted, f"user:{user.id}:memories")[0] == 200


@pytest.mark.django_db(transaction=True)
def test_stream_tenant_channel_is_every_roles_and_topics_need_their_grant(
    server: str, tenant: Tenant
) -> None:
    _, reader = accounts.api_key_create(tenant=tenant, role="read-only")
    assert _stream_status(server, reader, f"tenant:{tenant.id}:shared,system:global")[0] == 200
    status, body = _stream_status(server, reader, "topic:news:updates")
    assert status == 403
    assert body["missing_grant"] == "topic:news"


def test_a_bulk_write_records_its_key_in_history(world: World, tenant: Tenant) -> None:
    client = client_for(tenant, "agent", [f"user:{world.user_id}"])
    key_id = client.get("/v1/whoami").json()["key_id"]
    item = {"user_id": world.user_id, "content": "bulk fact", "type": "fact", "metadata": {}}
    response = client.post("/v1/memories/batch", {"items": [item]}, format="json")
    assert response.json()["ok"] == 1, response.content
    memory_id = response.json()["results"][0]["id"]
    entry = MemoryHistory.objects.get(memory_id=memory_id)
    assert str(entry.actor_key_id) == key_id
    created = [
        event.payload
        for event in OutboxEvent.objects.filter(event_type="memory.created")
        if event.payload["memory"]["id"] == memory_id
    ]
    assert [event["source"]["api_key_id"] for event in created] == [key_id]
