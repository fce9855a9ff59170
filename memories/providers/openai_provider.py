"""Providers for any OpenAI-compatible endpoint: OpenAI, Azure, vLLM, Ollama.

Every failure, whether of the transport or of the answer's shape, becomes a ProviderError with a
message a person can act on; nothing the model says is trusted before it has been checked (how an
answer is read and validated is memories.providers.llm_answers).
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar, cast

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from memories.metrics import PROVIDER_ERRORS
from memories.providers.base import Decision, ExistingMemory, ProviderError, ProviderRejected
from memories.providers.llm_answers import UnreadableAnswer, read_decisions, read_facts
from memories.providers.throttle import Throttle

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXTRACT_PROMPT = """\
You extract durable facts about the user from a conversation between the user and an assistant.
Keep only facts that will still be true and useful later: who the user is, where they live and
work, their preferences, relationships, plans, habits, and facts they retract ("No longer eats
meat"). Ignore greetings, questions, small talk and anything the assistant says about itself.
Write each fact as a short third-person sentence without a subject, e.g. "Lives in Paris",
"Likes hiking", "Name is Alice".
The conversation arrives as JSON: {"conversation": [{"role": ..., "content": ...}, ...]}.
Answer with a JSON object and nothing else: {"facts": ["...", "..."]}. No facts: {"facts": []}."""

# Memories are shown with ids 1..n, not their UUIDs: models copy short integers reliably, while
# long UUIDs come back subtly altered or invented. The caller maps the numbers back.
DECIDE_PROMPT = """\
You maintain a store of memories about a user. You get the existing memories, each with an
integer id, and new facts. For each new fact choose one event:
- "ADD": the fact is new; give its "text".
- "UPDATE": the fact changes an existing memory (a new city, a new employer, a corrected value);
  give the memory's "id" and the new "text".
- "DELETE": the fact says an existing memory is no longer true; give the memory's "id".
- "NONE": the fact is already stored; give the memory's "id".
Only use ids from the existing memories. Never target the same id twice.
The input arrives as JSON: {"memories": [{"id": 1, "text": "..."}], "facts": ["..."]}.
Answer with a JSON object and nothing else:
{"memory": [{"event": "ADD" | "UPDATE" | "DELETE" | "NONE", "id": <int>, "text": "..."}]}"""

# The repair round: the model sees its own answer above this, and what was wrong with it.
REPAIR_PROMPT = """\
That answer could not be used: {problem}.
Answer again with only the JSON object the instructions ask for, in exactly that format:
no other text, no code fences."""

# Statuses that may pass if asked again (as the openai client judges them too); any other 4xx
# is the endpoint refusing this request, which it will refuse again.
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
# Retry delays as the openai client's own: 0.5 s doubling to 8 s, less up to 25 % jitter; a
# server's Retry-After of up to two minutes is honoured as given.
_FIRST_RETRY_SECONDS, _LAST_RETRY_SECONDS, _MOST_RETRY_AFTER_SECONDS = 0.5, 8.0, 120.0

# A process talks to one or two endpoints; the bound only keeps a process that is handed many
# (the tests' fake servers) from keeping every client it ever made. A client dropped here lives on
# while a provider holds it.
_MOST_CLIENTS = 8
_clients: OrderedDict[tuple[str, str, float], openai.OpenAI] = OrderedDict()
_clients_lock = threading.Lock()


def _client(api_key: str, base_url: str, timeout: float) -> openai.OpenAI:
    """One client per endpoint per process, shared by its LLM and its embedder and by every thread:
    one pool of keep-alive connections (httpx's), not a TCP and TLS handshake per call. Its own
    retries are off: `_Endpoint.call` retries, so that a 429 pauses every thread (Throttle)."""
    key = (api_key, base_url, timeout)
    with _clients_lock:
        if (client := _clients.get(key)) is None:
            # Local endpoints (vLLM, Ollama) need no key, but the client refuses to start without.
            client = openai.OpenAI(
                api_key=api_key or "no-key", base_url=base_url, timeout=timeout, max_retries=0
            )
            _clients[key] = client
            while len(_clients) > _MOST_CLIENTS:
                _clients.popitem(last=False)
        _clients.move_to_end(key)
        return client


def _retry_after(response: httpx.Response | None) -> float | None:
    """The server's Retry-After in seconds (`retry-after-ms`, `retry-after` in seconds or as a
    date), when it gives one (it may exceed what a call waits: see `_Endpoint.call`)."""
    if response is None:
        return None
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            seconds = email.utils.mktime_tz(parsed) - time.time() if parsed else math.nan
        if seconds > 0 and not math.isnan(seconds):
            return seconds
    return None


def _is_transient(exc: openai.OpenAIError) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in _TRANSIENT_STATUSES or status >= 500)


class _Endpoint:
    """One model endpoint as this process uses it: the shared client, at most `max_concurrency`
    calls in flight (whatever the number of threads), and retries of transient failures that
    honour the server's Retry-After; a 429 holds back every thread's calls (Throttle), not only
    the one that got it."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        max_retries: int,
        max_concurrency: int,
        who: str,
        endpoint: str,
    ) -> None:
        self.client = _client(api_key, base_url, timeout)
        self.endpoint = endpoint  # `llm` or `embeddings`: the provider_errors_total label
        self.max_retries = max_retries
        self.throttle = Throttle(limit=max_concurrency)
        self.who = who

    def call(self, send: Callable[[], T]) -> T:
        for retry in range(self.max_retries + 1):
            try:
                with self.throttle.slot():
                    return send()
            except openai.OpenAIError as exc:
                PROVIDER_ERRORS.labels(endpoint=self.endpoint, error=_error_kind(exc)).inc()
                if not _is_transient(exc):
                    raise
                asked = _retry_after(getattr(exc, "response", None))
                delay = min(asked, _MOST_RETRY_AFTER_SECONDS) if asked else None
                if delay is None:
                    delay = min(_FIRST_RETRY_SECONDS * 2**retry, _LAST_RETRY_SECONDS)
                    delay *= 1 - 0.25 * random.random()
                if getattr(exc, "status_code", None) == 429:
                    self.throttle.rate_limited(seconds=delay, who=self.who)
                    delay = 0  # the throttle holds this thread's next call back as well
                # A wait longer than two minutes is the job's to take (it retries with backoff),
                # not a thread's; the pause above still spares the endpoint meanwhile.
                if retry == self.max_retries or (asked or 0) > _MOST_RETRY_AFTER_SECONDS:
                    raise
                logger.info("%s: %s; retrying in %.2f s", self.who, type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the last attempt returned or raised


def _error_kind(exc: openai.OpenAIError) -> str:
    status = getattr(exc, "status_code", None)
    if status == 429:
        return "rate_limited"
    return "transient" if _is_transient(exc) else "rejected"


def _excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _post_json(client: openai.OpenAI, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to the endpoint through the openai client (its connection pool, auth, error
    types), and the answer's JSON as a dict. Not through the client's typed resources: they walk
    the request through its TypedDict transform and build a pydantic model of the answer (an
    object per number of an embedding), for the three fields we read: measured against the fake
    server, a chat call took 2.4-2.6 ms of CPU that way and 1.1 ms this way, an embedding of three
    texts 5.5 ms and 1.2-1.6. An answer that is not a JSON object fails the call."""
    response = client.post(path, body=body, cast_to=httpx.Response)
    try:
        answer = json.loads(response.content)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise openai.APIResponseValidationError(
            # The client's own response type (httpx2's), whatever `cast_to` names.
            response=cast(Any, response),
            body=None,
            message="the answer is not a JSON object",
        )
    return answer


class OpenAILLM:
    """An LLMProvider over the chat completions API, answering in JSON mode.

    Each call asks once and, when the answer cannot be read, once more with the reason (the
    repair round); a second unusable answer is a ProviderError, never an empty result.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        timeout: float = 60.0,
        max_retries: int = 1,
        max_concurrency: int = 64,
    ) -> None:
        self.base_url = base_url
        self.model = model
        # What may pass (connection errors, timeouts, 408/409/429, 5xx) is asked again with
        # backoff; the job retries after that (ProviderError.retryable).
        self._endpoint = _Endpoint(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            who=self._who(),
            endpoint="llm",
        )
        # JSON mode until the server refuses the option itself (LM Studio wants a json_schema,
        # some servers know no response_format): then plain text, which the reading copes with.
        self._json_mode = True

    def extract_facts(self, messages: list[dict[str, str]]) -> list[str]:
        if not messages:
            return []
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self._ask(EXTRACT_PROMPT, {"conversation": conversation}, read_facts)

    def decide(self, facts: list[str], memories: list[ExistingMemory]) -> list[Decision]:
        if not facts:
            return []
        shown = [{"id": m.id, "text": m.text} for m in memories]
        # Ids come back as the model wrote them: the caller applies only those it showed.
        return self._ask(DECIDE_PROMPT, {"memories": shown, "facts": facts}, read_decisions)

    def _who(self) -> str:
        return f"model {self.model} at {self.base_url}"

    def _ask(self, system: str, payload: dict[str, Any], read: Callable[[str | None], T]) -> T:
        """The answer to one prompt, read by `read`, with one repair round if it cannot be."""
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": system},
            {"role": "user", "content": json.dumps(payload, ensure_ascii=False)},
        ]
        content, cut_off = self._chat(messages)
        try:
            return read(content)
        except UnreadableAnswer as exc:
            problem = _problem(exc, cut_off)
        logger.warning(
            "%s gave an unusable answer (%s); asking once more: %s",
            self._who(),
            problem,
            _excerpt(content or ""),
        )
        messages += [
            {"role": "assistant", "content": content or ""},
            {"role": "user", "content": REPAIR_PROMPT.format(problem=problem)},
        ]
        content, cut_off = self._chat(messages)
        try:
            return read(content)
        except UnreadableAnswer as exc:
            problem = _problem(exc, cut_off)
            # The answer itself goes to the log only: the error is what a tenant reads back.
            logger.warning(
                "%s gave an unusable answer again (%s): %s",
                self._who(),
                problem,
                _excerpt(content or ""),
            )
            PROVIDER_ERRORS.labels(endpoint="llm", error="unusable_answer").inc()
            raise ProviderError(
                f"{self._who()} gave no usable answer, even when asked again: {problem}"
            ) from exc

    def _chat(self, messages: list[ChatCompletionMessageParam]) -> tuple[str | None, bool]:
        """One JSON-mode call: the answer's text, and whether it was cut off at the length limit.

        Servers that ignore `response_format` answer anyway; the reading copes with that."""
        try:
            try:
                answer = self._create(messages)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if not (self._json_mode and "response_format" in exc.message.lower()):
                    raise
                logger.warning(
                    "%s refuses response_format (HTTP %s); asking without it from now on",
                    self._who(),
                    exc.status_code,
                )
                self._json_mode = False
                answer = self._create(messages)
        except openai.OpenAIError as exc:
            raise _call_failed(self._who(), exc) from exc
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None, False
        choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None, choice.get(
            "finish_reason"
        ) == "length"

    def _create(self, messages: list[ChatCompletionMessageParam]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self._json_mode:
            body["response_format"] = {"type": "json_object"}
        return self._endpoint.call(
            lambda: _post_json(self._endpoint.client, "/chat/completions", body)
        )


def _problem(exc: UnreadableAnswer, cut_off: bool) -> str:
    return f"{exc}{' (the answer was cut off at the length limit)' if cut_off else ''}"


class OpenAIEmbedder:
    """An Embedder over the embeddings API: all texts in one request."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        dimensions: int,
        send_dimensions: bool = True,
        timeout: float = 60.0,
        max_retries: int = 1,
        max_concurrency: int = 64,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.dimensions = dimensions
        # Only some models (text-embedding-3-*) accept `dimensions`; others reject the request.
        self.send_dimensions = send_dimensions
        self._who = f"embedding model {model} at {base_url}"
        self._endpoint = _Endpoint(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            who=self._who,
            endpoint="embeddings",
        )

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        who = self._who
        options: dict[str, Any] = {"dimensions": self.dimensions} if self.send_dimensions else {}
        try:
            # "float" explicitly: the client otherwise asks for base64, which not every server has.
            body = {"model": self.model, "input": texts, "encoding_format": "float", **options}
            answer = self._endpoint.call(
                lambda: _post_json(self._endpoint.client, "/embeddings", body)
            )
        except openai.OpenAIError as exc:
            raise _call_failed(who, exc) from exc
        data = answer.get("data")
        if not isinstance(data, list) or not all(
            isinstance(item, dict) and isinstance(item.get("embedding"), list) for item in data
        ):
            raise ProviderError(f"{who} answered without a list of embeddings")
        data = sorted(data, key=lambda item: item.get("index", -1))
        if [item.get("index") for item in data] != list(range(len(texts))):
            raise ProviderError(f"{who} returned {len(data)} vectors for {len(texts)} texts")
        vectors = [[float(x) for x in item["embedding"]] for item in data]
        for vector in vectors:
            if len(vector) != self.dimensions:
                raise ProviderError(
                    f"{who} returned {len(vector)} dimensions, {self.dimensions} are configured"
                )
        return vectors


def _call_failed(who: str, exc: openai.OpenAIError) -> ProviderError:
    """A failed call as a ProviderError: ProviderRejected when the endpoint refused it (a 4xx
    other than 408/409/429), so the job does not ask again."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in _TRANSIENT_STATUSES:
        return ProviderRejected(f"{_failure(who, exc)}: the endpoint refused the request")
    return ProviderError(_failure(who, exc))


def _failure(who: str, exc: openai.OpenAIError) -> str:
    """Our words for a failed call: the error's kind and HTTP status, never the provider's text
    (which tenants would read back in a job's error); the log has the whole exception."""
    status = getattr(exc, "status_code", None)
    return f"{who} failed ({type(exc).__name__}{f', HTTP {status}' if status else ''})"
