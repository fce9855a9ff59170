"""The API's bridge from uvicorn to Django's WSGI handler: the request whole into the view, the
response whole out of it, streaming responses as they are produced."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import pytest

from memories import accounts
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
    app: BufferedWSGIMiddleware,
    incoming: list[dict[str, Any]],
    sent: list[dict] | None = None,
    *,
    content_length: int | None = None,
) -> tuple[list[dict], int]:
    """Run one request through `app`, its Content-Length the size of `incoming` unless given;
    return what it sent and how many messages it received (after `incoming`, the client is
    gone)."""
    sent = [] if sent is None else sent
    received = 0
    if content_length is None:
        content_length = sum(len(message["body"]) for message in incoming)
    scope = {**SCOPE, "headers": [*SCOPE["headers"], (b"content-length", b"%d" % content_length)]}

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, received


def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response(
        "201 Created", [("Content-Type", "text/plain"), ("X-Query", environ["QUERY_STRING"])]
    )
    return [b"got ", body]


def test_a_body_in_pieces_reaches_the_view_whole_and_the_answer_leaves_in_one_message() -> None:
    app = BufferedWSGIMiddleware(echo, threads=2)
    sent, _ = serve(app, pieces(b"hello ", b"wor", b"ld"))
    assert sent == [
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"text/plain"), (b"x-query", b"a=1")],
        },
        {"type": "http.response.body", "body": b"got hello world"},
    ]


def test_a_body_declared_over_the_limit_is_not_read_at_all(settings) -> None:
    # Django refuses it from its Content-Length; reading it would only invite the upload.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10
    app = BufferedWSGIMiddleware(echo, threads=2)
    sent, received = serve(app, pieces(b"12345678", b"12345678"))
    assert received == 0 and sent[1]["body"] == b"got "
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 16  # the limit is read at each call
    sent, received = serve(app, pieces(b"12345678", b"12345678"))
    assert received == 2 and sent[1]["body"] == b"got 1234567812345678"


def test_an_error_page_replaces_the_headers_of_a_response_not_yet_sent() -> None:
    def fails_then_answers(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Half", "done")])
        try:
            raise ValueError("broke after starting")
        except ValueError:
            start_response("500 Internal Server Error", [("X-Error", "1")], sys.exc_info())
        return [b"error page"]

    sent, _ = serve(BufferedWSGIMiddleware(fails_then_answers, threads=2), pieces(b""))
    assert sent[0]["status"] == 500 and sent[0]["headers"] == [(b"x-error", b"1")]
    assert sent[1]["body"] == b"error page"


def test_an_app_that_never_starts_its_response_is_an_error_not_an_empty_answer() -> None:
    closed: list[bool] = []

    class Silent(list):
        def close(self) -> None:
            closed.append(True)

    app = BufferedWSGIMiddleware(lambda environ, start_response: Silent([b"x"]), threads=2)
    with pytest.raises(RuntimeError, match="start_response"):
        serve(app, pieces(b""))  # uvicorn answers a raising app with a 500
    assert closed == [True]


def test_a_client_gone_before_its_body_was_whole_reaches_no_view() -> None:
    calls: list[bytes] = []

    def record(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b""]

    app = BufferedWSGIMiddleware(record, threads=2)
    half = {"type": "http.request", "body": b'{"half', "more_body": True}
    sent, _ = serve(app, [half], content_length=100)  # then the client is gone
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

    app = BufferedWSGIMiddleware(stream, threads=2)
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
    headers = {"Authorization": f"Bearer {accounts.api_key_create(tenant=tenant)[1]}"}
    with uvicorn_live_server() as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        created = http.post("/v1/users", json={"external_id": "ada"}, headers=headers)
        assert created.status_code == 201 and created.json()["external_id"] == "ada"
        too_big = http.post("/v1/users", json={"metadata": {"x": "y" * 5_000}}, headers=headers)
        assert too_big.status_code == 400 and list(too_big.json()["fields"]) == ["body"]


@pytest.mark.django_db(transaction=True)
def test_a_call_without_a_valid_key_is_refused_before_its_body_is_read() -> None:
    import socket
    from urllib.parse import urlsplit

    with uvicorn_live_server() as base_url:
        address = urlsplit(base_url)
        for authorization in ("", "Authorization: Bearer mem_not_a_key\r\n"):
            with socket.create_connection((address.hostname, address.port), timeout=5) as conn:
                # Headers announcing 10 MB, and not one byte of the body: the answer must not
                # wait for it.
                conn.sendall(
                    (
                        "POST /v1/memories HTTP/1.1\r\nHost: test\r\n"
                        "Content-Type: application/json\r\nContent-Length: 10000000\r\n"
                        f"{authorization}\r\n"
                    ).encode()
                )
                answer = conn.recv(4096).decode(errors="replace")
            assert answer.startswith("HTTP/1.1 401"), answer[:200]
