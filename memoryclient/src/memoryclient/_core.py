"""What the sync and async clients share: each API call as a request spec (`Call`) with the
function that reads its answer, the retry policy, error mapping, and the subscription's state.

The two clients are thin transports: they send a `Call` (sleeping between retries their own way),
and hand the response to `Call.parse`. Nothing here does I/O.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from httpx_sse import ServerSentEvent

from memoryclient.errors import MemoryClientError, error_for

T = TypeVar("T")
Json = dict[str, Any]
Jsons = list[Json]  # for classes whose `list` method hides the builtin in annotations

# Filters whose value the list endpoint reads as JSON (memories.filters on the server).
_JSON_FILTERS = ("metadata", "created_at", "updated_at", "occurred_at")
# Statuses that mean "later": retried after Retry-After, a bounded number of times.
RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT = 30.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer. `wait` is server-side waiting (seconds) the
    transport adds to its read timeout."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    wait: float = 0.0


@dataclass(frozen=True)
class Page:
    results: list[Json]
    next_cursor: str | None


# --- Reading answers ------------------------------------------------------------------------------


def _json(response: httpx.Response) -> Json:
    return dict(response.json())


def _nothing(response: httpx.Response) -> None:
    return None


def _key(name: str) -> Callable[[httpx.Response], Any]:
    return lambda response: response.json()[name]


def _page(name: str) -> Callable[[httpx.Response], Page]:
    def parse(response: httpx.Response) -> Page:
        body = response.json()
        return Page(results=list(body.get(name) or []), next_cursor=body.get("next_cursor"))

    return parse


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _query(**values: Any) -> dict[str, str]:
    """Query parameters without the unset ones, each as the server reads it."""
    return {name: _text(value) for name, value in values.items() if value is not None}


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def _body(**values: Any) -> Json:
    return {name: value for name, value in values.items() if value is not None}


# --- The calls ------------------------------------------------------------------------------------


def messages_normalize(messages: str | Sequence[Mapping[str, Any]]) -> list[Json]:
    """A string is one user message; otherwise a list of `{role, content, timestamp?}`."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(message) for message in messages]


def create_user(external_id: str | None, metadata: Mapping[str, Any] | None) -> Call[str]:
    body = _body(external_id=external_id, metadata=dict(metadata) if metadata else None)
    return Call("POST", "/v1/users", _key("user_id"), json=body)


def get_user(user_id: str) -> Call[Json]:
    return Call("GET", f"/v1/users/{user_id}", _json)


def find_user(external_id: str) -> Call[Json | None]:
    def first(response: httpx.Response) -> Json | None:
        results = response.json().get("results") or []
        return dict(results[0]) if results else None

    return Call("GET", "/v1/users", first, params={"external_id": external_id})


def delete_user(user_id: str) -> Call[Json]:
    return Call("DELETE", f"/v1/users/{user_id}", _json)


def add(
    user_id: str,
    messages: str | Sequence[Mapping[str, Any]],
    *,
    wait: float | None,
    idempotency_key: str | None,
    fields: Mapping[str, Any],
) -> Call[Json]:
    body = {"user_id": user_id, "messages": messages_normalize(messages), **fields}
    if wait:
        body["wait"] = wait
    return Call(
        "POST",
        "/v1/memories",
        _json,
        json=body,
        headers=_idempotency(idempotency_key),
        wait=wait or 0.0,
    )


def status(request_id: str, *, wait: float | None) -> Call[Json]:
    return Call(
        "GET", f"/v1/requests/{request_id}", _json, params=_query(wait=wait), wait=wait or 0.0
    )


def write(
    user_id: str | None,
    content: str,
    *,
    type: str,
    scope: str,
    topic: str | None,
    metadata: Mapping[str, Any] | None,
    merge: str | None,
    idempotency_key: str | None,
    fields: Mapping[str, Any],
) -> Call[Json]:
    body = _body(
        user_id=user_id,
        content=content,
        type=type,
        scope=scope,
        topic=topic,
        metadata=dict(metadata) if metadata is not None else None,
        merge=merge,
        **fields,
    )
    return Call(
        "POST", "/v1/memories/direct", _json, json=body, headers=_idempotency(idempotency_key)
    )


def get(memory_id: str) -> Call[Json]:
    return Call("GET", f"/v1/memories/{memory_id}", _json)


def list_page(user_id: str, filters: Mapping[str, Any], cursor: str | None) -> Call[Page]:
    params = _query(user_id=user_id, cursor=cursor, **filters)
    for name in _JSON_FILTERS:  # JSON even when a plain value is given ({"gte": ...} or "x")
        if name in filters and not isinstance(filters[name], dict):
            params[name] = json.dumps(filters[name])
    return Call("GET", "/v1/memories", _page("results"), params=params)


def search(user_id: str, query: str, options: Mapping[str, Any]) -> Call[list[Json]]:
    body = {"user_id": user_id, "query": query, **options}
    if isinstance(body.get("topics"), tuple | set | frozenset):
        body["topics"] = list(body["topics"])
    return Call("POST", "/v1/memories/search", _key("results"), json=body)


def patch(
    memory_id: str,
    body: Mapping[str, Any],
    *,
    if_version: int | None = None,
    idempotency_key: str | None = None,
) -> Call[Json]:
    headers = _idempotency(idempotency_key)
    if if_version is not None:
        headers["If-Match"] = f'"{if_version}"'
    return Call("PATCH", f"/v1/memories/{memory_id}", _json, json=dict(body), headers=headers)


def update_body(
    *,
    content: str | None,
    metadata: Mapping[str, Any] | None,
    base_clock: Mapping[str, int] | None,
    merge: bool,
    fields: Mapping[str, Any],
) -> Json:
    body = _body(
        content=content,
        metadata=dict(metadata) if metadata is not None else None,
        base_clock=dict(base_clock) if base_clock is not None else None,
        **fields,
    )
    if merge:
        body["merge"] = True
    return body


def delete(memory_id: str, *, idempotency_key: str | None) -> Call[None]:
    return Call(
        "DELETE", f"/v1/memories/{memory_id}", _nothing, headers=_idempotency(idempotency_key)
    )


def history_page(memory_id: str, cursor: str | None) -> Call[Page]:
    params = _query(cursor=cursor)
    return Call("GET", f"/v1/memories/{memory_id}/history", _page("history"), params=params)


def batch(
    items: Iterable[Mapping[str, Any]], *, run_async: bool, idempotency_key: str | None
) -> Call[Json]:
    body: Json = {"items": [dict(item) for item in items]}
    if run_async:
        body["async"] = True
    return Call(
        "POST", "/v1/memories/batch", _json, json=body, headers=_idempotency(idempotency_key)
    )


def conflicts_page(memory_id: str | None, status: str | None, cursor: str | None) -> Call[Page]:
    params = _query(memory_id=memory_id, status=status, cursor=cursor)
    return Call("GET", "/v1/conflicts", _page("results"), params=params)


def resolve(conflict_id: str, choice: Mapping[str, Any]) -> Call[Json]:
    return Call("POST", f"/v1/conflicts/{conflict_id}/resolve", _json, json=dict(choice))


def events(filters: Mapping[str, Any]) -> Call[list[Json]]:
    return Call("GET", "/v1/events", _key("events"), params=_query(**filters))


def whoami() -> Call[Json]:
    return Call("GET", "/v1/whoami", _json)


def sync_query(
    user_id: str | None,
    *,
    scope: str | None,
    topic: str | None,
    include_shared: bool | None,
    topics: Sequence[str] | None,
) -> dict[str, str]:
    """The set a sync or digest is about: a user's view (with the shared sets it names), the
    tenant's shared memories (`scope="tenant"`) or one topic."""
    return _query(
        user_id=user_id,
        scope=scope,
        topic=topic,
        include_shared=include_shared or None,
        topics=list(topics) if topics else None,
    )


def sync(query: Mapping[str, str], *, since: str | None, limit: int | None) -> Call[Json]:
    return Call("GET", "/v1/sync", _json, params={**query, **_query(since=since, limit=limit)})


def sync_path(path: str, *, since: str | None) -> Call[Json]:
    """A sync by the URL the server named (a 410's `snapshot`), optionally continued."""
    return Call("GET", path, _json, params=_query(since=since))


def sync_digest(query: Mapping[str, str]) -> Call[Json]:
    return Call("GET", "/v1/sync/digest", _json, params=dict(query))


# --- Answers: errors and retries ------------------------------------------------------------------


def retry_after(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before asking again: the server's Retry-After (seconds or a date), else
    a doubling backoff; never more than MAX_RETRY_WAIT."""
    raw = response.headers.get("Retry-After", "").strip()
    seconds: float | None = None
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
    if seconds is None:
        seconds = 0.5 * 2**attempt
    return min(max(seconds, 0.0), MAX_RETRY_WAIT)


def should_retry(response: httpx.Response, attempt: int, max_retries: int) -> bool:
    return response.status_code in RETRY_STATUSES and attempt < max_retries


def raise_for(response: httpx.Response) -> None:
    """Raise the SDK's error for a refusal; return for a success."""
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = {"message": response.text[:500]}
    retry: float | None = None
    if "Retry-After" in response.headers:
        retry = retry_after(response, 0)
    raise error_for(response.status_code, body, retry_after=retry)


def client_headers(api_key: str, agent_id: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "memoryclient/0.1"}
    if agent_id:
        headers["X-Agent-Id"] = agent_id
    return headers


# --- Subscriptions --------------------------------------------------------------------------------


class SSEDecoder:
    """Lines of `text/event-stream` in, events and comments out.

    Ours, not httpx-sse's iterator: that one drops comments, and the server's `: subscribed`
    comment is the moment from which the stream misses nothing (a cache syncs after it)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id = ""

    def feed(self, line: str) -> ServerSentEvent | str | None:
        """An event when `line` ends one, a comment's text for a comment, else None."""
        if line == "":
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(event=self._event, data="\n".join(self._data), id=self._id)
            self._event, self._data = "", []
            return event
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            return value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


class SubscriptionState:
    """Where a subscription stands: the last stream id received and how to reconnect.

    `handle` turns one server-sent event into what the caller sees: memory and other events as
    dicts (each with its stream `id`); a `batch` frame unpacked into its events; `stream-reset`
    passed on as `{"event_type": "stream-reset", ...}` (what was missed must be fetched with
    sync); `overflow` ends the connection and resumes from the id it names, with no gap.
    """

    MIN_DELAY = 0.1
    MAX_DELAY = 5.0

    def __init__(
        self,
        channels: Sequence[str],
        *,
        last_event_id: str | None,
        batch_ms: int | None,
        types: Sequence[str] | None,
    ) -> None:
        if isinstance(channels, str):
            channels = [channels]
        self.channels = list(channels)
        self.last_event_id = last_event_id
        self.batch_ms = batch_ms
        self.types = list(types) if types else None
        self.subscribed = False  # the current connection's `: subscribed` was read
        self.failures = 0  # consecutive connections that failed before subscribing
        self.reconnect = False  # the current connection should be left (overflow)

    def request(self) -> tuple[dict[str, str], dict[str, str]]:
        params = _query(channels=self.channels, batch_ms=self.batch_ms, types=self.types)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self.subscribed = False
        self.reconnect = False
        return params, headers

    def on_comment(self, text: str) -> None:
        if text.strip() == "subscribed":
            self.subscribed = True
            self.failures = 0

    def handle(self, sse: ServerSentEvent) -> list[Json]:
        try:
            data = json.loads(sse.data) if sse.data else {}
        except ValueError:
            data = {"data": sse.data}
        if not isinstance(data, dict):
            data = {"data": data}
        out: list[Json]
        if sse.event == "overflow":
            self.reconnect = True
            out = []
            resume = data.get("last_event_id") or sse.id
            if resume:
                self.last_event_id = str(resume)
            return out
        if sse.event == "stream-reset":
            out = [{"event_type": "stream-reset", "id": sse.id, **data}]
        elif sse.event == "batch":
            out = [dict(event) for event in data.get("events") or []]
            for event in out:
                event.setdefault("id", sse.id)
        else:
            out = [{"id": sse.id, **data} if sse.id else data]
            out[0].setdefault("event_type", sse.event)
        if sse.id:
            self.last_event_id = sse.id
        return out

    def failed(self) -> float:
        """The connection ended or failed: seconds to wait before the next one."""
        if self.reconnect:
            return 0.0
        if self.subscribed:  # it had worked: try again at once, then back off
            self.failures = 0
            return self.MIN_DELAY
        self.failures += 1
        return min(self.MIN_DELAY * 2 ** (self.failures - 1), self.MAX_DELAY)


def fatal(error: MemoryClientError) -> bool:
    """A refusal that reconnecting will not cure (bad key, channel, parameter)."""
    return 400 <= error.status < 500 and error.status not in RETRY_STATUSES
