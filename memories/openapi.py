"""The published contract: what drf-spectacular needs beyond the views' own `extend_schema`.

- `errors(...)`: the error answers an operation documents, all with the one `Error` body
  (memories.api_errors.ErrorOutput). Every `/v1` call may be refused with 400 (a body too big),
  401 (no valid key) and 429 (the tenant's rate limit): those come with any list.
- `AutoSchema`: component names that do not collide (views nest serializers of the same name).
- `ApiKeyScheme`: `Authorization: Bearer <key>` (memories.auth) as the `ApiKey` security scheme.
- The SSE stream (`GET /v1/stream`), served by the ASGI app before Django, documented through a
  view that only the generator sees (`StreamDocs`), marked `x-fuzz: false` so fuzzers leave it.
- Hooks: only `/v1` is published (the old aliases are not), and the OpenAPI links a client (or a
  stateful fuzzer) follows from a created user to its job, the job's status and its memories.

`make openapi` writes the result to `openapi.yaml`; tests/test_openapi.py fails when it is stale.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from memories.api_errors import ErrorOutput
from memories.events.schema import EVENT_TYPES

# What each error status means here (the `error` codes it carries).
_ERRORS = {
    400: "Invalid input (`invalid_request`): `fields` names what is wrong; nothing changed.",
    401: "No valid API key (`not_authenticated`, `authentication_failed`).",
    403: "The key's role or grants do not allow it (`forbidden`, `missing_grant` says which).",
    404: "Not found, or not this tenant's (`not_found`).",
    409: (
        "A conflict: the same job is live (`duplicate_request`, with its `request_id`), the "
        "external id is taken (`already_exists`, with its `user_id`), a tenant limit "
        "(`limit_reached`), or a write kept as a manual-merge `conflict`."
    ),
    410: "The cursor is older than purged deletions (`cursor_expired`, with a `snapshot`).",
    412: "`If-Match` (or `base_version`) is stale (`version_conflict`, `current_version`).",
    422: "The `Idempotency-Key` was used for another request (`idempotency_key_reused`).",
    429: "Rate limited or overloaded (`rate_limited`, `overloaded`): retry after `Retry-After`.",
    502: "The model provider failed (`provider_unavailable`); nothing changed.",
}
_ALWAYS = (400, 401, 429)


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """The error answers of an operation: those named, and those every call may get."""
    return {
        code: OpenApiResponse(ErrorOutput, description=_ERRORS[code])
        for code in sorted({*_ALWAYS, *codes})
    }


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    location=OpenApiParameter.HEADER,
    description="Up to 255 characters: the same key and request answer the first answer again.",
)
IF_MATCH = OpenApiParameter(
    "If-Match",
    str,
    location=OpenApiParameter.HEADER,
    description='The version the change is based on (`"3"`): stale -> 412.',
)


class AutoSchema(openapi.AutoSchema):
    """Component names from where a serializer is declared: a view's nested `InputSerializer`
    is `<View>Input` (`UserCreateInput`), `MemoryOutput` is `Memory`, so that no two collide."""

    def get_serializer_name(self, serializer: Any, direction: Any) -> str:
        *owner, name = type(serializer).__qualname__.split(".")
        name = name.removesuffix("Serializer").removesuffix("Output")
        return "".join(part.removesuffix("Api") for part in owner) + name


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "memories.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `manage.py createapikey`, or `POST /v1/keys`.",
        }


# --- The event stream ----------------------------------------------------------------------------


class EventSourceOutput(serializers.Serializer):
    agent_id = serializers.CharField(allow_blank=True)
    session_id = serializers.CharField(allow_blank=True)
    user_id = serializers.CharField(allow_blank=True)
    tenant_id = serializers.CharField(allow_blank=True)
    api_key_id = serializers.CharField(allow_blank=True)


class EventOutput(serializers.Serializer):
    """One event (schema 1), as `/v1/events` replays it and `/v1/stream` sends it as `data:`."""

    id = serializers.CharField(allow_null=True, help_text="The stream id (`<ms>-<seq>`).")
    schema = serializers.IntegerField()
    event_id = serializers.UUIDField()
    event_type = serializers.ChoiceField(choices=EVENT_TYPES)
    timestamp = serializers.DateTimeField()
    memory = serializers.DictField(
        allow_null=True, help_text="The memory as `GET /v1/memories/{id}` shows it."
    )
    source = EventSourceOutput()  # type: ignore[assignment]  # a field
    channels = serializers.ListField(child=serializers.CharField())
    data = serializers.DictField()  # type: ignore[assignment]  # a field


class StreamBatchOutput(serializers.Serializer):
    """Lazy mode (`batch_ms`): `event: batch`, the events gathered, a memory's coalesced."""

    events = EventOutput(many=True)


class StreamControlOutput(serializers.Serializer):
    """`event: overflow` (reconnect from `last_event_id`) or `event: stream-reset` (the id is
    older than the stream keeps: read `GET /v1/sync`, then the live events follow)."""

    last_event_id = serializers.CharField(required=False)
    message = serializers.CharField(required=False)


class StreamDocs(APIView):
    """Never routed: `/v1/stream` is `memories.events.sse.stream_app` (ASGI). The generator sees
    this view in its place (`only_the_api`)."""

    @extend_schema(
        operation_id="stream_subscribe",
        summary="Server-Sent Events over the event channels",
        description=(
            "`text/event-stream`: a `: subscribed` comment, then frames `id: <stream id>`, "
            "`event: <event_type>`, `data: <Event as JSON>`; `: heartbeat` comments while idle. "
            "Resume with `Last-Event-ID` (or `last_event_id`). With `batch_ms`, events come in "
            "`event: batch` frames (`StreamBatch`). `overflow` and `stream-reset` end a stream "
            "early (`StreamControl`). Long-lived: not for fuzzers (`x-fuzz: false`)."
        ),
        parameters=[
            OpenApiParameter(
                "channels",
                str,
                required=True,
                description="Comma-separated: `user:<id>:memories`, `tenant:<id>:shared`, "
                "`topic:<name>:updates`, `system:global`.",
            ),
            OpenApiParameter("types", str, description="Comma-separated event types."),
            OpenApiParameter(
                "batch_ms",
                int,
                description="Lazy mode: gather events this long (1 to 60,000 ms).",
            ),
            OpenApiParameter("last_event_id", str, description="As the header."),
            OpenApiParameter("Last-Event-ID", str, location=OpenApiParameter.HEADER),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                PolymorphicProxySerializer(
                    component_name="StreamFrame",
                    serializers=[EventOutput, StreamBatchOutput, StreamControlOutput],
                    resource_type_field_name=None,
                ),
                description="SSE frames; each `data:` is an Event (`event: <event_type>`), a "
                "StreamBatch (`event: batch`) or a StreamControl (`overflow`, `stream-reset`).",
            ),
            **errors(403, 404),
            503: OpenApiResponse(ErrorOutput, description="Too many open streams; retry."),
        },
        extensions={"x-fuzz": False},
        tags=["stream"],
    )
    def get(self, request: Request) -> Response:  # pragma: no cover - never routed
        raise NotImplementedError


# --- Hooks ---------------------------------------------------------------------------------------

_UNPUBLISHED = ("/v1/schema/", "/v1/docs/", "/v1/stream")


def only_the_api(endpoints: list[tuple[Any, ...]], **kwargs: Any) -> list[tuple[Any, ...]]:
    """The `/v1` API (not the old aliases, not the schema and its UI), and the stream."""
    kept = [e for e in endpoints if e[0].startswith("/v1/") and not e[0].startswith(_UNPUBLISHED)]
    return [*kept, ("/v1/stream", r"^v1/stream$", "GET", StreamDocs.as_view())]


# operationId -> status -> {link name: the operation it leads to, with what}.
LINKS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "user_create": {
        "201": {
            "GetUser": {
                "operationId": "user_get",
                "parameters": {"user_id": "$response.body#/user_id"},
            },
            "SubmitMemoryJob": {
                "operationId": "memory_job_submit",
                "requestBody": {
                    "user_id": "$response.body#/user_id",
                    "messages": [{"role": "user", "content": "I live in Paris."}],
                    "infer": False,
                    "wait": 5,
                },
            },
            "ListMemories": {
                "operationId": "memory_list",
                "parameters": {"user_id": "$response.body#/user_id"},
            },
        }
    },
    "memory_job_submit": {
        status: {
            "GetRequestStatus": {
                "operationId": "request_status",
                "parameters": {"request_id": "$response.body#/request_id"},
            }
        }
        for status in ("200", "202")
    },
    "request_status": {
        "200": {
            "GetMemory": {
                "operationId": "memory_get",
                "parameters": {"memory_id": "$response.body#/events/0/memory_id"},
            },
            "GetMemoryHistory": {
                "operationId": "memory_history",
                "parameters": {"memory_id": "$response.body#/events/0/memory_id"},
            },
        }
    },
    "user_delete": {
        "202": {
            "GetErasureStatus": {
                "operationId": "request_status",
                "parameters": {"request_id": "$response.body#/request_id"},
            }
        }
    },
}


def add_links(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Add `LINKS` to the responses of the operations they start from."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            for status, links in LINKS.get(operation.get("operationId"), {}).items():
                operation["responses"][status]["links"] = links
    return result
