"""What a client library needs to read back: a user by external id, the user a duplicate
external id names, a session and its messages."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_get_users_by_external_id_finds_the_user_or_nothing(api, other_api, end_user) -> None:
    found = api.get("/v1/users", {"external_id": "alice"})
    assert found.status_code == 200
    [user] = found.json()["results"]
    assert user["user_id"] == str(end_user.id) and user["external_id"] == "alice"
    assert api.get("/v1/users", {"external_id": "nobody"}).json() == {"results": []}
    assert other_api.get("/v1/users", {"external_id": "alice"}).json() == {"results": []}


def test_get_users_without_external_id_is_400_naming_it(api) -> None:
    response = api.get("/v1/users")
    assert response.status_code == 400
    assert "external_id" in response.json()["fields"]


def test_a_user_being_erased_is_not_found_by_external_id(api, end_user) -> None:
    assert api.delete(f"/v1/users/{end_user.id}").status_code == 202
    assert api.get("/v1/users", {"external_id": "alice"}).json() == {"results": []}


def test_duplicate_external_id_is_409_carrying_the_existing_user_id(api, end_user) -> None:
    response = api.post("/v1/users", {"external_id": "alice"}, format="json")
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "already_exists" and body["message"]
    assert body["user_id"] == str(end_user.id)


def test_a_session_is_read_back_with_its_messages_page_by_page(api, other_api, end_user) -> None:
    created = api.post(
        "/v1/sessions", {"user_id": str(end_user.id), "agent_id": "support"}, format="json"
    ).json()
    session_id = created["session_id"]
    messages = [{"role": "user", "content": f"message {n}"} for n in range(5)]
    url = f"/v1/sessions/{session_id}/messages"
    assert api.post(url, {"messages": messages}, format="json").status_code == 201

    session = api.get(f"/v1/sessions/{session_id}")
    assert session.status_code == 200 and session.json() == created

    first = api.get(url, {"limit": 3}).json()
    assert first["session_id"] == session_id
    assert [m["content"] for m in first["messages"]] == ["message 0", "message 1", "message 2"]
    assert set(first["messages"][0]) == {"id", "role", "content", "created_at"}
    rest = api.get(url, {"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [m["content"] for m in rest["messages"]] == ["message 3", "message 4"]
    assert rest["next_cursor"] is None

    assert other_api.get(f"/v1/sessions/{session_id}").status_code == 404
    assert other_api.get(url).status_code == 404
    assert api.get(url, {"cursor": "x"}).status_code == 400
