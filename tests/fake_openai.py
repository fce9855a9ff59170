"""A fake OpenAI-compatible HTTP server, so the real `openai` client can be tested with no network.

By default it answers like a model would, using the offline providers: extraction and decision
calls go to RuleBasedLLM, embeddings to HashingEmbedder. Tests script failures on top of that.

    with FakeOpenAI() as fake:
        fake.chat_handler = lambda body: "not json"
        OpenAILLM(api_key="k", base_url=fake.base_url, model="m").extract_facts(...)

    with FakeOpenAI() as fake:
        fake.answer_next("Sure! ```json\n{...}\n```", {"facts": []})  # the next two chat calls
        fake.fail_next(1, status=429, headers={"retry-after-ms": "10"})  # before those

As a process (for a Celery worker under test): `python -m tests.fake_openai --port 0 --delay 0`
prints its base URL on the first line and serves until killed.
"""

from __future__ import annotations

import argparse
import array
import base64
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from memories.providers.base import ExistingMemory
from memories.providers.offline import HashingEmbedder, RuleBasedLLM
from memories.providers.openai_provider import DECIDE_PROMPT, EXTRACT_PROMPT


@dataclass(frozen=True)
class FakeResponse:
    """A raw HTTP answer, for when a handler wants full control (a malformed body, a 429...)."""

    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeRequest:
    """One request the server received."""

    path: str
    body: Any


ChatHandler = Callable[[dict[str, Any]], "str | dict[str, Any] | list[Any] | FakeResponse"]
EmbeddingHandler = Callable[[dict[str, Any]], "list[list[float]] | FakeResponse"]


def error_body(message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def rule_based_chat(body: dict[str, Any]) -> str | FakeResponse:
    """Answer the provider's two prompts as a model would, with the rule-based LLM."""
    messages = body.get("messages") or []
    system = messages[0]["content"] if messages else ""
    if len(messages) > 1 and _MEM0_NEW_MESSAGES in messages[1]["content"]:
        return json.dumps({"memory": [{"text": fact} for fact in _mem0_facts(messages[1])]})
    # The prompt's payload is the first user message (a repair round appends more after it).
    payload = json.loads(messages[1]["content"]) if len(messages) > 1 else {}
    llm = RuleBasedLLM()
    if system == EXTRACT_PROMPT:
        return json.dumps({"facts": llm.extract_facts(payload["conversation"])})
    if system == DECIDE_PROMPT:
        memories = [ExistingMemory(id=m["id"], text=m["text"]) for m in payload["memories"]]
        decisions = llm.decide(payload["facts"], memories)
        answer = [
            {"event": d.event}
            | ({"id": d.memory_id} if d.memory_id is not None else {})
            | ({"text": d.text} if d.text is not None else {})
            for d in decisions
        ]
        return json.dumps({"memory": answer})
    return FakeResponse(400, error_body("unknown prompt", "invalid_request_error"))


# mem0 2.x's one extraction prompt (its user message: sections, the conversation under this one),
# answered with the same rule-based facts, so bench/mem0_side_by_side.py compares like with like.
_MEM0_NEW_MESSAGES = "## New Messages\n"


def _mem0_facts(message: dict[str, Any]) -> list[str]:
    section = message["content"].split(_MEM0_NEW_MESSAGES, 1)[1].split("\n## ", 1)[0]
    turns = []
    for line in section.splitlines():
        role, _, content = line.partition(":")
        if content and role.strip().lower() in ("user", "assistant"):
            turns.append({"role": role.strip().lower(), "content": content.strip()})
    return RuleBasedLLM().extract_facts(turns)


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 (or `host`) in a daemon thread; a context manager.

    `chat_handler(body)` returns the message content (str; a dict or list is sent as its JSON)
    or a FakeResponse; `embedding_handler(body)` returns the vectors or a FakeResponse. Answers
    scripted with `answer_next` come first, one per chat call; failures scripted with
    `fail_next` come before anything else. Every request is recorded in `requests`.
    """

    def __init__(
        self,
        *,
        delay_seconds: float = 0.0,
        dimensions: int = 384,
        port: int = 0,
        host: str = "127.0.0.1",
        chat_handler: ChatHandler | None = None,
        embedding_handler: EmbeddingHandler | None = None,
    ) -> None:
        self.delay_seconds = delay_seconds
        self.dimensions = dimensions
        self.chat_handler: ChatHandler = chat_handler or rule_based_chat
        self.embedding_handler: EmbeddingHandler = embedding_handler or self._hashing_embeddings
        self._lock = threading.Lock()
        self._requests: list[FakeRequest] = []
        # (status, headers) for the next calls of any kind, consumed in order
        self._failures: list[tuple[int, dict[str, str]]] = []
        self._scripted: list[str | dict[str, Any] | list[Any] | FakeResponse] = []
        self._ids = itertools.count(1)
        # `host`: another address of this machine, e.g. a bridge that network namespaces reach.
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[FakeRequest]:
        with self._lock:
            return list(self._requests)

    def fail_next(
        self, n: int, status: int = 500, *, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next `n` calls, of any kind, with an HTTP error in OpenAI's error shape."""
        with self._lock:
            self._failures.extend([(status, dict(headers or {}))] * n)

    def answer_next(self, *answers: str | dict[str, Any] | list[Any] | FakeResponse) -> None:
        """Answer the next chat calls with these, in order (as a chat_handler's return values),
        then go back to `chat_handler`."""
        with self._lock:
            self._scripted.extend(answers)

    def start(self) -> FakeOpenAI:
        # A short poll interval: shutdown() waits for the loop to look, 0.5 s by default.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _hashing_embeddings(self, body: dict[str, Any]) -> list[list[float]]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return HashingEmbedder(body.get("dimensions") or self.dimensions).embed(texts)

    def _answer(self, path: str, body: Any) -> FakeResponse:
        with self._lock:
            self._requests.append(FakeRequest(path=path, body=body))
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            status, headers = failure
            return FakeResponse(status, error_body(f"scripted failure {status}"), headers)
        if not isinstance(body, dict):
            return FakeResponse(400, error_body("body is not JSON", "invalid_request_error"))
        if path.endswith("/chat/completions"):
            time.sleep(self.delay_seconds)
            return self._chat(body)
        if path.endswith("/embeddings"):
            return self._embeddings(body)
        return FakeResponse(404, error_body(f"no route {path}", "invalid_request_error"))

    def _chat(self, body: dict[str, Any]) -> FakeResponse:
        with self._lock:
            scripted = self._scripted.pop(0) if self._scripted else None
        content = scripted if scripted is not None else self.chat_handler(body)
        if isinstance(content, FakeResponse):
            return content
        if isinstance(content, dict | list):
            content = json.dumps(content)
        completion = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(json.dumps(body.get("messages")), content),
        }
        return FakeResponse(200, completion)

    def _embeddings(self, body: dict[str, Any]) -> FakeResponse:
        vectors = self.embedding_handler(body)
        if isinstance(vectors, FakeResponse):
            return vectors
        as_base64 = body.get("encoding_format") == "base64"  # the client's default
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(array.array("f", vector).tobytes()).decode()
                    if as_base64
                    else vector
                ),
            }
            for i, vector in enumerate(vectors)
        ]
        usage = _usage(json.dumps(body.get("input")), "")
        del usage["completion_tokens"]
        return FakeResponse(
            200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
        )


def _usage(prompt: str, completion: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(completion.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _handler_for(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
        # Headers and body go out in two writes: with Nagle's algorithm the body waited for the
        # client's delayed ACK, ~40 ms on every answer, which no real endpoint adds.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError:
                body = raw.decode(errors="replace")
            try:
                response = fake._answer(self.path.split("?")[0], body)
            except Exception as exc:  # a broken handler must answer, not hang the client
                response = FakeResponse(500, error_body(f"{type(exc).__name__}: {exc}"))
            self._send(response)

        def do_GET(self) -> None:
            self._send(FakeResponse(404, error_body("only POST is served")))

        def _send(self, response: FakeResponse) -> None:
            is_text = isinstance(response.body, str)
            payload = (response.body if is_text else json.dumps(response.body)).encode()
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", "text/plain" if is_text else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing left to tell it

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each chat answer")
    parser.add_argument("--dimensions", type=int, default=384)
    args = parser.parse_args()
    fake = FakeOpenAI(delay_seconds=args.delay, dimensions=args.dimensions, port=args.port)
    print(fake.base_url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        fake.serve_forever()


if __name__ == "__main__":
    main()
