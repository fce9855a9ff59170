"""The API's bridge from uvicorn to Django's WSGI handler: the request whole into the view, the
response whole out of it, streaming responses as they are produced."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from memories import services
from memoryproject.wsgi_bridge import BufferedWSGIMiddleware
from tests.live_server import uvicorn_live_server

SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/echo",
    "query_string": b"a=1",
    "headers": [(b"content-type", b"text/plain")],
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
}


def pieces(*chunks: bytes) -> list[dict[str, Any]]:
    """A request body as the ASGI server hands it over, piece by piece."""
    return [
        {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
        for n, chunk in enumerate(chunks)
    ]


def serve(
    app: BufferedWSGIMiddleware, incoming: list[dict[str, Any]], sent: list[dict] | None = None
) -> tuple[list[dict], int]:
    """Run one request through `app`; return what it sent and how many messages it received
    (after `incoming`, the client is gone)."""
    sent = [] if sent is None else sent
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(SCOPE, receive, send))
    return sent, received


def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response(
        "201 Created", [("Content-Type", "text/plain"), ("X-Query", environ["QUERY_STRING"])]
    )
    return [b"got ", body]


def test_a_body_in_pieces_reaches_the_view_whole_and_the_answer_leaves_in_one_message() -> None:
    app = BufferedWSGIMiddleware(echo, threads=2, max_body_bytes=1000)
    sent, _ = serve(app, pieces(b"hello ", b"wor", b"ld"))
    assert sent == [
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"text/plain"), (b"x-query", b"a=1")],
        },
        {"type": "http.response.body", "body": b"got hello world"},
    ]


def test_a_body_over_the_limit_is_read_no_further_than_one_piece_past_it() -> None:
    app = BufferedWSGIMiddleware(echo, threads=2, max_body_bytes=10)
    sent, received = serve(app, pieces(*[b"12345678"] * 5))
    assert received == 2  # 16 bytes read: past the limit, so the other 24 are left unread
    assert sent[1]["body"] == b"got " + b"12345678" * 2


def test_a_client_gone_before_its_body_was_whole_reaches_no_view() -> None:
    calls: list[bytes] = []

    def record(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b""]

    app = BufferedWSGIMiddleware(record, threads=2, max_body_bytes=1000)
    half = {"type": "http.request", "body": b'{"half', "more_body": True}
    sent, _ = serve(app, [half])  # then the client is gone
    assert calls == [] and sent == []


def test_a_streaming_response_is_sent_as_it_is_produced() -> None:
    sent_before_second_chunk: list[bytes] = []

    class Streaming:
        streaming = True  # as Django's StreamingHttpResponse says of itself
        closed = False

        def __iter__(self):
            yield b"one"
            sent_before_second_chunk.extend(m["body"] for m in sent if "body" in m)
            yield b"two"

        def close(self) -> None:
            Streaming.closed = True

    def stream(environ: dict[str, Any], start_response: Any) -> Streaming:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Streaming()

    app = BufferedWSGIMiddleware(stream, threads=2, max_body_bytes=1000)
    sent: list[dict] = []
    serve(app, pieces(b""), sent)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert [m.get("body") for m in sent[1:]] == [b"one", b"two", b""]
    assert sent_before_second_chunk == [b"one"]  # the first chunk left before the second was made
    assert Streaming.closed


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_through_the_bridge_and_refuses_a_body_over_the_limit(
    tenant, settings
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2_000
    headers = {"Authorization": f"Bearer {services.api_key_create(tenant=tenant)[1]}"}
    with uvicorn_live_server() as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        created = http.post("/v1/users", json={"external_id": "ada"}, headers=headers)
        assert created.status_code == 201 and created.json()["external_id"] == "ada"
        too_big = http.post("/v1/users", json={"metadata": {"x": "y" * 5_000}}, headers=headers)
        assert too_big.status_code == 400 and list(too_big.json()["fields"]) == ["body"]
