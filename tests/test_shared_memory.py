"""Shared memory across agents: scopes, direct writes, versions and clocks, merges, conflicts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from memories.models import EndUser, Memory, MemoryHistory, OutboxEvent
from memories.pipeline import memory_request_run
from tests.helpers import submit_job

pytestmark = pytest.mark.django_db


def direct(api: APIClient, **body: Any) -> dict[str, Any]:
    response = api.post("/v1/memories/direct", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def patch(api: APIClient, memory_id: str, *, agent: str, **body: Any) -> Any:
    return api.patch(f"/v1/memories/{memory_id}", body, format="json", HTTP_X_AGENT_ID=agent)


def history(api: APIClient, memory_id: str) -> list[dict[str, Any]]:
    return api.get(f"/v1/memories/{memory_id}/history").json()["history"]


# --- Scopes and direct writes --------------------------------------------------------------------


def test_direct_write_returns_the_memory_with_version_and_clock(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="Prefers tea", agent_id="support")
    assert memory["version"] == 1
    assert memory["clock"] == {"support": 1}
    assert memory["user_id"] == str(end_user.id)
    assert memory["scope"] == "user" and memory["merge"] == "lww" and not memory["conflicted"]
    assert api.get(f"/v1/memories/{memory['id']}").json()["content"] == "Prefers tea"


def test_agent_id_comes_from_the_header_when_the_body_has_none(api, end_user: EndUser):
    response = api.post(
        "/v1/memories/direct",
        {"user_id": str(end_user.id), "content": "Lives in Oslo"},
        format="json",
        HTTP_X_AGENT_ID="phone",
    )
    assert response.json()["clock"] == {"phone": 1}
    assert response.json()["agent_id"] == "phone"


def test_a_tenant_memory_has_no_user_and_is_listed_and_searched_only_with_include_shared(
    api, end_user: EndUser
):
    shared = direct(api, content="The office closes at 6pm on Fridays", scope="tenant")
    assert shared["user_id"] is None and shared["scope"] == "tenant"
    direct(api, user_id=str(end_user.id), content="Likes jazz")
    own = api.get("/v1/memories", {"user_id": str(end_user.id)}).json()["results"]
    assert [m["content"] for m in own] == ["Likes jazz"]
    both = api.get("/v1/memories", {"user_id": str(end_user.id), "include_shared": "true"})
    assert {m["content"] for m in both.json()["results"]} == {
        "Likes jazz",
        "The office closes at 6pm on Fridays",
    }
    query = {"user_id": str(end_user.id), "query": "when does the office close on friday"}
    found = api.post("/v1/memories/search", query, format="json").json()["results"]
    assert shared["id"] not in [m["id"] for m in found]
    query["include_shared"] = True
    found = api.post("/v1/memories/search", query, format="json").json()["results"]
    assert found[0]["id"] == shared["id"]


def test_topic_memories_join_a_view_only_when_their_topic_is_named(api, end_user: EndUser):
    direct(api, content="Release freeze starts Monday", scope="topic", topic="releases")
    direct(api, content="Lunch is at noon", scope="topic", topic="office")
    listed = api.get("/v1/memories", {"user_id": str(end_user.id), "topics": "releases"}).json()[
        "results"
    ]
    assert [m["content"] for m in listed] == ["Release freeze starts Monday"]
    assert listed[0]["topic"] == "releases"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"content": "x", "scope": "tenant", "user_id": "USER"}, "user_id"),
        ({"content": "x", "scope": "user"}, "user_id"),
        ({"content": "x", "scope": "topic"}, "topic"),
        ({"content": "x", "scope": "tenant", "topic": "t"}, "topic"),
        ({"content": "x", "scope": "galaxy"}, "scope"),
        ({"content": "x", "user_id": "USER", "items": ["a"]}, "items"),
        ({"content": "x", "user_id": "USER", "type": "list", "value": 3}, "value"),
    ],
)
def test_a_direct_write_that_breaks_a_rule_is_a_400_naming_the_field(
    api, end_user: EndUser, body: dict[str, Any], field: str
):
    body = {k: (str(end_user.id) if v == "USER" else v) for k, v in body.items()}
    response = api.post("/v1/memories/direct", body, format="json")
    assert response.status_code == 400, response.json()
    assert field in response.json()["fields"]
    assert not Memory.objects.exists()


def test_a_shared_memory_is_evented_on_the_tenant_channel_not_a_user_channel(api, tenant):
    memory = direct(api, content="Support hours are 9 to 5", scope="tenant")
    event = OutboxEvent.objects.get(event_type="memory.created")
    assert event.payload["channels"] == [f"tenant:{tenant.id}:shared"]
    assert event.payload["memory"]["id"] == memory["id"]
    assert event.payload["memory"]["clock"] == memory["clock"]
    assert event.payload["memory"]["user_id"] is None


def test_a_job_with_scope_tenant_writes_shared_memories(end_user: EndUser, settings):
    request = submit_job(end_user, "I love hiking in the mountains", scope="tenant", topic="")
    assert memory_request_run(request_id=str(request.id)) == "done"
    memory = Memory.objects.get()
    assert memory.user_id is None and memory.scope == "tenant"
    assert memory.vector_clock == {"memory-job": 1}


def test_batch_items_may_write_shared_memories(api, end_user: EndUser):
    items = [
        {"content": "Shared via batch", "scope": "topic", "topic": "news"},
        {"content": "Mine", "user_id": str(end_user.id)},
        {"content": "Bad", "scope": "topic", "topic": "news", "user_id": str(end_user.id)},
    ]
    results = api.post("/v1/memories/batch", {"items": items}, format="json").json()["results"]
    assert [r["status"] for r in results] == ["ok", "ok", "error"]
    assert results[2]["error"]["field"] == "user_id"
    shared = Memory.objects.get(pk=results[0]["id"])
    assert (shared.user_id, shared.scope, shared.topic) == (None, "topic", "news")


# --- Versions, clocks and last-writer-wins -------------------------------------------------------


def test_a_stale_if_match_is_412_with_the_current_version_and_clock(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="Drinks coffee", agent_id="a")
    assert patch(api, memory["id"], agent="a", content="Drinks tea").status_code == 200
    stale = api.patch(
        f"/v1/memories/{memory['id']}",
        {"content": "Drinks water"},
        format="json",
        HTTP_IF_MATCH='"1"',
        HTTP_X_AGENT_ID="b",
    )
    assert stale.status_code == 412
    assert stale.json()["current_version"] == 2
    assert stale.json()["clock"] == {"a": 2}
    assert api.get(f"/v1/memories/{memory['id']}").json()["content"] == "Drinks tea"


def test_a_write_based_on_the_current_clock_applies_and_descends_from_it(api, end_user):
    memory = direct(api, user_id=str(end_user.id), content="Has a cat", agent_id="a")
    response = patch(api, memory["id"], agent="b", content="Has two cats", base_clock={"a": 1})
    assert response.status_code == 200
    assert response.json()["clock"] == {"a": 1, "b": 1}
    assert response.json()["version"] == 2


def test_concurrent_writes_with_merge_last_writer_wins_and_the_loser_stays_in_history(
    api, end_user: EndUser
):
    memory = direct(api, user_id=str(end_user.id), content="Meeting at 10", agent_id="a")
    base = memory["clock"]
    assert patch(api, memory["id"], agent="phone", content="Meeting at 11", base_clock=base)
    # The laptop wrote offline, before the phone, on the same base: it loses, and is kept.
    earlier = (timezone.now() - timedelta(minutes=5)).isoformat()
    late = patch(
        api,
        memory["id"],
        agent="laptop",
        content="Meeting at 12",
        base_clock=base,
        merge=True,
        written_at=earlier,
    )
    assert late.status_code == 200
    assert late.json()["content"] == "Meeting at 11"
    assert late.json()["clock"] == {"a": 1, "phone": 1, "laptop": 1}
    entries = history(api, memory["id"])
    assert entries[-1]["event"] == "OVERWRITTEN"
    assert entries[-1]["new_content"] == "Meeting at 12"
    # A concurrent write made later wins, and the value it overwrote stays as old_content.
    later = patch(
        api, memory["id"], agent="watch", content="Meeting at 1pm", base_clock=base, merge=True
    )
    assert later.json()["content"] == "Meeting at 1pm"
    entries = history(api, memory["id"])
    assert entries[-1]["event"] == "UPDATE" and entries[-1]["old_content"] == "Meeting at 11"
    assert "concurrent" in entries[-1]["reason"]
    said = {e["new_content"] for e in entries} | {e["old_content"] for e in entries}
    assert {"Meeting at 10", "Meeting at 11", "Meeting at 12", "Meeting at 1pm"} <= said


def test_a_concurrent_write_without_merge_is_412_and_changes_nothing(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="Size M", agent_id="a")
    patch(api, memory["id"], agent="b", content="Size L", base_clock={"a": 1})
    response = patch(api, memory["id"], agent="c", content="Size S", base_clock={"a": 1})
    assert response.status_code == 412
    assert response.json()["clock"] == {"a": 1, "b": 1}
    assert Memory.objects.get().content == "Size L"


# --- Lists and counters --------------------------------------------------------------------------


def test_a_list_merges_a_concurrent_add_and_remove_add_wins(api, end_user: EndUser):
    memory = direct(
        api, user_id=str(end_user.id), content="Groceries", type="list", items=["milk"],
        agent_id="a",
    )  # fmt: skip
    assert memory["items"] == ["milk"]
    base = memory["clock"]
    # b adds milk again (say, a second carton) while c, who saw only the first, removes it.
    added = patch(api, memory["id"], agent="b", add=["milk", "eggs"], base_clock=base)
    assert added.status_code == 200 and added.json()["items"] == ["milk", "eggs"]
    removed = patch(api, memory["id"], agent="c", remove=["milk"], base_clock=base)
    assert removed.status_code == 200
    assert removed.json()["items"] == ["milk", "eggs"]  # b's concurrent add survives
    # A remove that saw everything removes it.
    seen = removed.json()["clock"]
    final = patch(api, memory["id"], agent="c", remove=["milk"], base_clock=seen)
    assert final.json()["items"] == ["eggs"]


def test_a_counter_sums_every_agents_increments_and_decrements(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="Visits", type="counter", agent_id="a")
    assert memory["value"] == 0
    for agent, by in (("a", 2), ("b", 5), ("a", -1), ("c", 1)):
        response = patch(api, memory["id"], agent=agent, increment=by, base_clock={})
        assert response.status_code == 200
    assert api.get(f"/v1/memories/{memory['id']}").json()["value"] == 7


def test_list_operations_on_a_fact_are_a_400(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="A fact")
    response = patch(api, memory["id"], agent="a", increment=1)
    assert response.status_code == 400 and "increment" in response.json()["fields"]


# --- Manual merges: conflicts --------------------------------------------------------------------


def test_a_manual_memory_keeps_a_concurrent_write_as_a_conflict_to_resolve(api, end_user: EndUser):
    memory = direct(
        api, user_id=str(end_user.id), content="Budget is 10k", merge="manual", agent_id="a"
    )
    base = memory["clock"]
    assert patch(api, memory["id"], agent="b", content="Budget is 12k", base_clock=base)
    response = patch(api, memory["id"], agent="c", content="Budget is 9k", base_clock=base)
    assert response.status_code == 409
    conflict = response.json()["conflict"]
    assert conflict["current"]["content"] == "Budget is 12k"
    assert conflict["incoming"]["content"] == "Budget is 9k"
    assert conflict["incoming"]["agent_id"] == "c"
    current = api.get(f"/v1/memories/{memory['id']}").json()
    assert current["content"] == "Budget is 12k" and current["conflicted"] is True
    listed = api.get("/v1/conflicts").json()["results"]
    assert [c["id"] for c in listed] == [conflict["id"]]
    detected = OutboxEvent.objects.filter(event_type="conflict.detected").get()
    assert detected.payload["data"]["conflict"]["id"] == conflict["id"]

    resolved = api.post(
        f"/v1/conflicts/{conflict['id']}/resolve", {"choose": "incoming"}, format="json"
    )
    assert resolved.status_code == 200
    assert resolved.json()["memory"]["content"] == "Budget is 9k"
    assert resolved.json()["memory"]["conflicted"] is False
    assert resolved.json()["conflict"]["status"] == "resolved"
    assert api.get("/v1/conflicts").json()["results"] == []
    again = api.post(
        f"/v1/conflicts/{conflict['id']}/resolve", {"choose": "current"}, format="json"
    )
    assert again.status_code == 404


def test_resolving_with_content_writes_it(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="v1", merge="manual", agent_id="a")
    patch(api, memory["id"], agent="b", content="v2", base_clock={"a": 1})
    conflict = patch(api, memory["id"], agent="c", content="v3", base_clock={"a": 1}).json()
    response = api.post(
        f"/v1/conflicts/{conflict['conflict']['id']}/resolve",
        {"content": "v2 and v3"},
        format="json",
    )
    assert response.json()["memory"]["content"] == "v2 and v3"
    bad = api.post(f"/v1/conflicts/{conflict['conflict']['id']}/resolve", {}, format="json")
    assert bad.status_code == 400


# --- Every order of concurrent writes ends the same ----------------------------------------------


AGENTS = ("a", "b", "c")


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    order=st.permutations(AGENTS),
    minutes=st.lists(st.integers(0, 3), min_size=3, max_size=3),
)
def test_concurrent_fact_writes_converge_in_any_order_and_lose_nothing_from_history(
    api, end_user: EndUser, order: list[str], minutes: list[int]
):
    memory = direct(api, user_id=str(end_user.id), content="start", agent_id="origin")
    base = memory["clock"]
    start = timezone.now() - timedelta(minutes=10)
    writes = {
        agent: (f"value from {agent}", (start + timedelta(minutes=m)).isoformat())
        for agent, m in zip(AGENTS, minutes, strict=True)
    }
    for agent in order:
        content, written_at = writes[agent]
        response = patch(
            api, memory["id"], agent=agent, content=content, base_clock=base, merge=True,
            written_at=written_at,
        )  # fmt: skip
        assert response.status_code == 200
    final = api.get(f"/v1/memories/{memory['id']}").json()
    # The greatest (written_at, agent_id) wins whatever the order the server saw them in.
    winner = max(AGENTS, key=lambda agent: (writes[agent][1], agent))
    assert final["content"] == writes[winner][0]
    assert final["clock"] == {"origin": 1, "a": 1, "b": 1, "c": 1}
    kept = set(
        MemoryHistory.objects.filter(memory_id=memory["id"]).values_list("new_content", flat=True)
    )
    assert {content for content, _ in writes.values()} <= kept


def test_an_agent_writes_shared_memories_only_with_the_shared_write_grant(tenant, end_user):
    from memories import accounts

    def agent(*grants: str) -> APIClient:
        _, raw = accounts.api_key_create(
            tenant=tenant, name="bot", role="agent", grants=list(grants)
        )
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return client

    body = {"content": "Shared rule", "scope": "tenant"}
    refused = agent("*").post("/v1/memories/direct", body, format="json")
    assert refused.status_code == 403
    assert refused.json()["missing_grant"] == "shared:write"
    written = agent("shared:write").post("/v1/memories/direct", body, format="json")
    assert written.status_code == 201
    assert written.json()["clock"] == {"bot": 1}  # no agent id given: the key's name
    topic = agent("topic:news").post(
        "/v1/memories/direct",
        {"content": "News", "scope": "topic", "topic": "sports"},
        format="json",
    )
    assert topic.status_code == 403 and topic.json()["missing_grant"] == "topic:sports"
    # Every role reads the tenant's shared memories.
    reader = agent(f"user:{end_user.id}")
    listed = reader.get("/v1/memories", {"user_id": str(end_user.id), "include_shared": "true"})
    assert [m["content"] for m in listed.json()["results"]] == ["Shared rule"]


def test_a_resolve_sent_again_with_its_idempotency_key_answers_the_first_time_again(
    api, end_user: EndUser
):
    memory = direct(api, user_id=str(end_user.id), content="v1", merge="manual", agent_id="a")
    patch(api, memory["id"], agent="b", content="v2", base_clock={"a": 1})
    conflict = patch(api, memory["id"], agent="c", content="v3", base_clock={"a": 1}).json()
    url = f"/v1/conflicts/{conflict['conflict']['id']}/resolve"
    first = api.post(url, {"choose": "incoming"}, format="json", HTTP_IDEMPOTENCY_KEY="r-1")
    again = api.post(url, {"choose": "incoming"}, format="json", HTTP_IDEMPOTENCY_KEY="r-1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert Memory.objects.get().version == first.json()["memory"]["version"]  # applied once


def test_a_conflict_sent_with_an_idempotency_key_is_kept_once_and_replayed(api, end_user: EndUser):
    memory = direct(api, user_id=str(end_user.id), content="v1", merge="manual", agent_id="a")
    patch(api, memory["id"], agent="b", content="v2", base_clock={"a": 1})

    def send() -> Any:
        return api.patch(
            f"/v1/memories/{memory['id']}",
            {"content": "v3", "base_clock": {"a": 1}},
            format="json",
            HTTP_X_AGENT_ID="c",
            HTTP_IDEMPOTENCY_KEY="offline-write-7",
        )

    first, again = send(), send()
    assert first.status_code == again.status_code == 409
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    listed = api.get("/v1/conflicts").json()["results"]
    assert [c["id"] for c in listed] == [first.json()["conflict"]["id"]]  # kept, and once
