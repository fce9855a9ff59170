"""Malformed input, generated: every write and read endpoint answers anything short of a 500.

Known-good bodies are mutated at random (a leaf swapped for a value of another JSON type, an odd
string or number; a key dropped or added), with a fixed seed so a failure replays. Each case that
this found is also a named test elsewhere; this one guards the shapes nobody thought to name.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from tests.helpers import store_memories

pytestmark = pytest.mark.django_db

ROUNDS = 40
ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5,
    1e308,
    "",
    " ",
    "x" * 30_000,
    "\x00",
    "\ud800",
    "²",
    [],
    {},
    [1, [2]],
    {"a": {"b": None}},
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "high",
    "update",
]
ADDED_KEYS = ["id", "type", "metadata", "action", "priority", "async", "limit", "threshold"]
ODD_QUERIES = [
    "limit=abc",
    "limit=-1",
    "limit=99999999999999999999",
    "cursor=%00",
    "cursor=" + "A" * 50,
    "metadata=%7B",
    "metadata=[1]",
    "metadata=%7B%22a%22%3A%20NaN%7D",
    "metadata=%7B%22a%22%3A%201e400%7D",
    "metadata=" + "%5B" * 1500 + "%5D" * 1500,
    "type=zzz",
    "since=notadate",
    "before=2026-13-45",
    "after=zz",
    "status=zz",
    "user_id=zz",
]


def mutated(value: Any, rng: random.Random) -> Any:
    if rng.random() < 0.25:
        return copy.deepcopy(rng.choice(ODD_VALUES))
    if isinstance(value, dict):
        out = {key: mutated(child, rng) for key, child in value.items()}
        if out and rng.random() < 0.15:
            out.pop(rng.choice(list(out)))
        if rng.random() < 0.1:
            out[rng.choice(ADDED_KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES))
        return out
    if isinstance(value, list):
        return [mutated(child, rng) for child in value]
    return value


def test_no_malformed_input_gets_a_500(settings, api, end_user) -> None:
    settings.RATE_LIMIT_PER_SECOND = 0  # every call must reach its view
    api.raise_request_exception = False  # a 500 is answered, so it can be collected
    uid = str(end_user.id)
    rng = random.Random(7)
    server_errors, statuses = [], []
    for _ in range(ROUNDS):
        # Fresh targets each round: a round's mutations may delete the memory or end the session.
        (memory,) = store_memories(end_user, "Lives in Paris")
        mid = str(memory.id)
        session = api.post("/v1/sessions", {"user_id": uid}, format="json").json()["session_id"]
        request_id = api.post(
            "/v1/memories",
            {"user_id": uid, "messages": [{"role": "user", "content": f"I like {mid}."}]},
            format="json",
        ).json()["request_id"]
        for method, path, seed in _writes(uid, mid, session):
            body = json.dumps(mutated(seed, rng))
            response = getattr(api, method)(path, data=body, content_type="application/json")
            statuses.append(response.status_code)
            if response.status_code >= 500:
                server_errors.append((method, path, body[:300]))
        for path in _reads(uid, mid, session, request_id):
            query = f"{path}{'&' if '?' in path else '?'}{rng.choice(ODD_QUERIES)}"
            response = api.get(query)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                server_errors.append(("get", query[:300], ""))
    assert server_errors == []
    assert 429 not in statuses and any(200 <= code < 300 for code in statuses)


def _writes(uid: str, mid: str, session: str) -> list[tuple[str, str, Any]]:
    item = {"action": "create", "user_id": uid, "content": "Likes jam", "metadata": {"a": 1}}
    job = {
        "user_id": uid,
        "messages": [{"role": "user", "content": "I like tea."}],
        "metadata": {"a": 1},
        "agent_id": "a",
        "session_id": "s",
        "infer": True,
        "priority": "high",
    }
    search = {
        "user_id": uid,
        "query": "Paris",
        "limit": 5,
        "threshold": 0.1,
        "filters": {"agent_id": "a", "type": "fact", "metadata": {"a": 1}},
    }
    changes = [
        item,
        {"action": "update", "id": mid, "user_id": uid, "content": "Lives in Rome"},
        {"action": "delete", "id": mid, "user_id": uid},
    ]
    webhook = {"url": "http://127.0.0.1:9/hook", "event_types": ["memory.created"], "channels": []}
    return [
        ("post", "/v1/users", {"external_id": "bob", "metadata": {"a": 1}}),
        ("post", "/v1/memories", job),
        ("post", "/v1/memories/search", search),
        ("post", "/v1/memories/batch", {"items": changes, "async": False}),
        ("post", "/v1/memories/batch", {"items": [item], "async": True}),
        ("patch", f"/v1/memories/{mid}", {"content": "Lives in Oslo", "metadata": {"a": 1}}),
        ("post", "/v1/sessions", {"user_id": uid, "agent_id": "a", "metadata": {"a": 1}}),
        (
            "post",
            f"/v1/sessions/{session}/messages",
            {"messages": [{"role": "user", "content": "hi"}]},
        ),
        ("post", f"/v1/sessions/{session}/end", {"summarize": True}),
        ("post", "/v1/webhooks", webhook),
    ]


def _reads(uid: str, mid: str, session: str, request_id: str) -> list[str]:
    return [
        f"/v1/memories?user_id={uid}&limit=5",
        f"/v1/memories/{mid}",
        f"/v1/memories/{mid}/history",
        f"/v1/requests/{request_id}",
        "/v1/requests?status=failure&limit=3",
        f"/v1/sync?user_id={uid}&limit=2",
        f"/v1/events?user_id={uid}&limit=2",
        f"/v1/sessions/{session}/timeline",
        f"/v1/sessions/{session}/reconstruct",
        "/v1/webhooks",
        "/v1/analytics/events",
    ]
