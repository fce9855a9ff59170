"""The HTTP API: one view per action; views validate, call a service or selector, and render."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import threading
from datetime import datetime, tzinfo
from functools import partial
from typing import Any, cast

import prometheus_client
from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from prometheus_client import multiprocess
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from memories import (
    accounts,
    backpressure,
    erasure,
    ledger,
    metrics,
    search,
    selectors,
    versioned_writes,
)
from memories.access import Access, Actor
from memories.api_idempotency import idempotency_key, idempotent_write
from memories.auth import TenantPrincipal
from memories.batch import memories_batch_apply
from memories.dispatch import Queue, lane_for
from memories.errors import InvalidInput
from memories.events.schema import acting_key_id, typed_value
from memories.filters import DATE_FIELDS, FIELDS, memory_filters_parse
from memories.models import Memory, MemoryConflict, MemoryRequest, Tenant
from memories.openapi import IDEMPOTENCY_KEY, IF_MATCH, errors
from memories.parsers import strict_loads
from memories.providers.wiring import get_embedder
from memories.queue_load import QueueDepthCollector
from memories.validation import parse_datetime_value, unstorable_text
from memoryproject.celery import app

logger = logging.getLogger(__name__)


class TenantApi(APIView):
    """Base view: bounded bodies, and the calling tenant at hand."""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        # The events this call's changes record name its key (reset in finalize_response).
        self._acting_key = acting_key_id.set(self.access.key_id)
        self.rate_limit_headers = backpressure.rate_limit(str(self.tenant.id))
        length = request.META.get("CONTENT_LENGTH") or "0"
        if length.isdigit() and int(length) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raise InvalidInput(
                f"Request body exceeds {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.", field="body"
            )

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        for header, value in getattr(self, "rate_limit_headers", {}).items():
            response.setdefault(header, value)
        token = self.__dict__.pop("_acting_key", None)
        if token is not None:
            acting_key_id.reset(token)
        return super().finalize_response(request, response, *args, **kwargs)

    @property
    def tenant(self) -> Tenant:
        # ApiKeyAuthentication (the only authentication) makes request.user a TenantPrincipal.
        return cast(TenantPrincipal, self.request.user).tenant

    @property
    def access(self) -> Access:
        """The calling key's rights (memories.access)."""
        return Access.of(self.request.user)

    def user_allowed(self, user: Any, *, write: bool = False) -> None:
        """The key may read (or write) this user's memories, jobs and sessions: 403 otherwise."""
        self.access.user(user.id, write=write, created_by_key_id=user.created_by_key_id)

    def memory_allowed(self, memory_id: Any, *, write: bool = False) -> None:
        """The key may read (or write) this memory, by its scope: 403 otherwise, 404 if it is not
        the tenant's. An admin may do anything, so its calls skip the read."""
        access = self.access
        if not access.is_admin:
            access.memory(
                selectors.memory_owner(tenant=self.tenant, memory_id=memory_id), write=write
            )

    def _memory_check(self, memory: Memory, *, write: bool) -> None:
        """May this key read (or change) this memory (one already read), by its scope?"""
        self.access.memory(memory, write=write)

    def _shared_read_check(self, *, include_shared: bool, topics: tuple[str, ...]) -> None:
        if include_shared:
            self.access.shared()
        for topic in topics:
            self.access.topic(topic)

    def _scope_write_check(self, scope: str, topic: str, user: Any = None) -> None:
        """May this key write memories of this scope (a user's, the tenant's, a topic's)?"""
        if scope == Memory.Scope.TENANT:
            self.access.shared(write=True)
        elif scope == Memory.Scope.TOPIC:
            self.access.topic(topic, write=True)
        elif user is not None:
            self.user_allowed(user, write=True)

    def actor(self, agent_id: str | None = None) -> Actor:
        """Who a change is recorded as: `agent_id` from the body, else X-Agent-Id, else the
        key's name."""
        return self.access.actor(agent_id=agent_id or self.request.headers.get("X-Agent-Id"))


class JsonObjectField(serializers.DictField):
    """A JSON object stored in a jsonb column (metadata): one PostgreSQL could not store is a 400
    naming the field, not an error in the database."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value = super().to_internal_value(data)
        problem = unstorable_text(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value


# One serializer per class and thread, used again for every request. Building one deep copies and
# re-creates each of its fields (DRF binds fields to their serializer): that was 85 % of validating
# a memory job, ~0.5 ms of CPU per POST here, and most of answering a correction. A serializer
# keeps no state but the data of the call in progress, which `validated_input` resets; an output's
# `to_representation` keeps none at all.
_serializers = threading.local()


def _serializer(serializer_class: type[serializers.Serializer]) -> serializers.Serializer:
    by_class = _serializers.__dict__.setdefault("by_class", {})
    serializer = by_class.get(serializer_class)
    if serializer is None:
        serializer = by_class[serializer_class] = serializer_class()
    return serializer


def validated_input(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    """The serializer's validated data; a non-object body or a bad field is a 400 naming it."""
    if not isinstance(data, dict):
        raise InvalidInput("The body must be a JSON object.", field="body")
    serializer = _serializer(serializer_class)
    for result in ("_validated_data", "_errors", "_data"):  # the previous call's
        serializer.__dict__.pop(result, None)
    serializer.initial_data = data
    try:
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data
    finally:
        serializer.initial_data = None  # no request body kept past its call


def represented(serializer_class: type[serializers.Serializer], instance: Any) -> dict[str, Any]:
    """`serializer_class(instance).data`, without building the serializer again."""
    return _serializer(serializer_class).to_representation(instance)


# How long a call may wait for its request to finish; the ASGI layer holds it, not a thread.
MAX_WAIT = 20


def _wait_header(seconds: float) -> dict[str, str]:
    """The mark asking memories.request_waits to hold the answer (dropped under plain WSGI)."""
    return {"X-Memory-Wait-Seconds": f"{seconds:g}"} if seconds > 0 else {}


# --- Users ---------------------------------------------------------------------------------------


class UserOutput(serializers.Serializer):
    user_id = serializers.UUIDField(source="id")
    external_id = serializers.CharField(allow_null=True)
    metadata = serializers.JSONField()
    created_at = serializers.DateTimeField()


class UserListOutput(serializers.Serializer):
    results = UserOutput(many=True)


class RequestAcceptedOutput(serializers.Serializer):
    """A job accepted (202): poll `GET /v1/requests/{request_id}`."""

    request_id = serializers.UUIDField()
    status = serializers.CharField()


class UserCreateApi(TenantApi):
    """`POST` creates a user (a taken `external_id` is 409 naming its `user_id`); `GET
    ?external_id=` finds one: `{"results": [user]}`, empty when there is none."""

    class InputSerializer(serializers.Serializer):
        external_id = serializers.CharField(required=False, allow_null=True, max_length=200)
        metadata = JsonObjectField(required=False, default=dict)

    class FindInput(serializers.Serializer):
        external_id = serializers.CharField(max_length=200)

    @extend_schema(
        operation_id="user_find",
        parameters=[FindInput],
        responses={200: UserListOutput, **errors(403)},
        tags=["users"],
    )
    def get(self, request: Request) -> Response:
        data = validated_input(self.FindInput, request.query_params.dict())
        user = selectors.end_user_find(tenant=self.tenant, external_id=data["external_id"])
        if user is not None:  # found: whether the key may read them (absent: nothing to see)
            self.user_allowed(user)
        return Response({"results": [UserOutput(user).data] if user else []})

    @extend_schema(
        operation_id="user_create",
        request=InputSerializer,
        responses={201: UserOutput, **errors(403, 409)},
        tags=["users"],
    )
    def post(self, request: Request) -> Response:
        self.access.user_create()
        data = validated_input(self.InputSerializer, request.data)
        user = accounts.end_user_create(
            tenant=self.tenant,
            external_id=data.get("external_id"),
            metadata=data["metadata"],
            created_by_key_id=self.access.key_id,
        )
        return Response(UserOutput(user).data, status=status.HTTP_201_CREATED)


class UserDetailApi(TenantApi):
    @extend_schema(
        operation_id="user_get", responses={200: UserOutput, **errors(403, 404)}, tags=["users"]
    )
    def get(self, request: Request, user_id: str) -> Response:
        user = selectors.end_user_get(tenant=self.tenant, user_id=user_id)
        self.user_allowed(user)
        return Response(UserOutput(user).data)

    @extend_schema(
        operation_id="user_delete",
        responses={202: RequestAcceptedOutput, **errors(403, 404, 409)},
        tags=["users"],
    )
    def delete(self, request: Request, user_id: str) -> Response:
        """Erase the user: a job (202), polled at /v1/requests/{request_id}; the user is not
        found from now on, and the finished request's `events` hold the receipt."""
        user = selectors.end_user_get(tenant=self.tenant, user_id=user_id)
        self.user_allowed(user, write=True)
        memory_request = erasure.user_erasure_submit(user=user)
        body = {"request_id": str(memory_request.id), "status": memory_request.status}
        return Response(body, status=status.HTTP_202_ACCEPTED)


# --- Memory jobs ---------------------------------------------------------------------------------


class MessageInput(serializers.Serializer):
    role = serializers.ChoiceField(choices=["user", "assistant", "system", "tool"])
    content = serializers.CharField(
        max_length=settings.MEMORY_MAX_CONTENT_CHARS, trim_whitespace=False
    )
    # When it was said (ISO 8601): the memories the job makes are dated by its latest message.
    timestamp = serializers.DateTimeField(required=False)

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        message = dict(super().to_internal_value(data))
        if "timestamp" in message:  # stored in the payload (JSON), and so in the request hash
            message["timestamp"] = message["timestamp"].isoformat()
        return message


class MemoryRequestOutput(serializers.Serializer):
    request_id = serializers.UUIDField(source="id")
    kind = serializers.CharField()
    status = serializers.CharField()
    error = serializers.CharField(allow_blank=True)
    events = serializers.JSONField(source="result")
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class MemoryOutput(serializers.Serializer):
    """A memory, with the same keys as an event's `memory` (memories.events.schema)."""

    id = serializers.UUIDField()
    user_id = serializers.UUIDField(allow_null=True)  # none for a shared memory
    content = serializers.CharField()
    type = serializers.CharField()
    scope = serializers.CharField()
    topic = serializers.CharField()
    metadata = serializers.JSONField()
    agent_id = serializers.CharField()
    session_id = serializers.CharField()
    version = serializers.IntegerField()
    clock = serializers.JSONField(source="vector_clock")
    merge = serializers.CharField(source="merge_rule")
    conflicted = serializers.BooleanField()
    written_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    occurred_at = serializers.DateTimeField()
    # Set once a later statement contradicted it (closed: no longer listed or searched).
    valid_to = serializers.DateTimeField(allow_null=True)

    def to_representation(self, instance: Any) -> dict[str, Any]:
        # A list's `items`, a counter's `value`, read from its merge state.
        return {**super().to_representation(instance), **typed_value(instance.type, instance.state)}


def _datetime_shown(value: datetime | None, zone: tzinfo) -> str | None:
    """What DRF's DateTimeField writes (ISO 8601 in the current time zone, UTC as `Z`)."""
    if value is None:
        return None
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _text_shown(value: Any) -> str | None:
    return None if value is None else str(value)


def memory_output_of_row(row: dict[str, Any], *, zone: tzinfo | None = None) -> dict[str, Any]:
    """MemoryOutput's representation of a memory read as a row (memories.search.RESULT_COLUMNS):
    the same keys and JSON, without a model instance and DRF's per-field calls (20 search
    results cost more that way than the search's SQL). tests/test_search.py pins the two equal.
    `zone`: the current time zone, looked up once for many rows (each lookup, a context-local
    read, costs as much as writing the row's five dates)."""
    if zone is None:
        zone = timezone.get_current_timezone()
    version = row["version"]
    return {
        "id": _text_shown(row["id"]),
        "user_id": _text_shown(row["user_id"]),
        "content": _text_shown(row["content"]),
        "type": _text_shown(row["type"]),
        "scope": _text_shown(row["scope"]),
        "topic": _text_shown(row["topic"]),
        "metadata": row["metadata"],
        "agent_id": _text_shown(row["agent_id"]),
        "session_id": _text_shown(row["session_id"]),
        "version": None if version is None else int(version),
        "clock": row["vector_clock"],
        "merge": _text_shown(row["merge_rule"]),
        "conflicted": None if row["conflicted"] is None else bool(row["conflicted"]),
        "written_at": _datetime_shown(row["written_at"], zone),
        "created_at": _datetime_shown(row["created_at"], zone),
        "updated_at": _datetime_shown(row["updated_at"], zone),
        "occurred_at": _datetime_shown(row["occurred_at"], zone),
        "valid_to": _datetime_shown(row["valid_to"], zone),
        **typed_value(row["type"], row["state"]),
    }


def _as_of(value: Any) -> datetime | None:
    return None if value in (None, "") else parse_datetime_value(value, field="as_of")


# Filters given as query parameters whose value is JSON (an object): the rest are plain strings.
_JSON_QUERY_FILTERS = ("metadata", *DATE_FIELDS)


def _encode_cursor(memory: Memory | MemoryConflict) -> str:
    raw = json.dumps([memory.created_at.isoformat(), str(memory.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, memory_id = strict_loads(base64.urlsafe_b64decode(cursor.encode()))
        serializers.UUIDField().to_internal_value(memory_id)
        serializers.DateTimeField().to_internal_value(created_at)
        return created_at, memory_id
    except (ValueError, TypeError, binascii.Error, serializers.ValidationError) as exc:
        raise InvalidInput("Malformed cursor.", field="cursor") from exc


class MemoryPageOutput(serializers.Serializer):
    results = MemoryOutput(many=True)
    next_cursor = serializers.CharField(allow_null=True)


# The filters /v1/memories takes as query parameters (memories.filters); some hold JSON.
_LIST_FILTER_PARAMETERS = [
    OpenApiParameter("agent_id", str),
    OpenApiParameter("session_id", str),
    OpenApiParameter("type", str, enum=[choice for choice, _ in Memory.Type.choices]),
    OpenApiParameter("scope", str, enum=[choice for choice, _ in Memory.Scope.choices]),
    *(
        OpenApiParameter(name, str, description="JSON: `{gte, gt, lte, lt}` of ISO 8601 dates.")
        for name in DATE_FIELDS
    ),
    OpenApiParameter("metadata", str, description="JSON object: containment and operators."),
    OpenApiParameter("as_of", str, description="ISO 8601: what was true then."),
]


class MemoryCollectionApi(TenantApi):
    """`POST` submits a memory job; `GET` lists a user's memories."""

    class InputSerializer(serializers.Serializer):
        user_id = serializers.UUIDField()
        # many=True: the ListSerializer takes max_length; the stub types only the child's kwargs.
        messages = MessageInput(  # type: ignore[call-arg]
            many=True, allow_empty=False, max_length=settings.MEMORY_MAX_MESSAGES
        )
        metadata = JsonObjectField(required=False, default=dict)
        agent_id = serializers.CharField(
            required=False, default="", allow_blank=True, max_length=200
        )
        session_id = serializers.CharField(
            required=False, default="", allow_blank=True, max_length=200
        )
        priority = serializers.ChoiceField(choices=MemoryRequest.Priority.choices, default="normal")
        infer = serializers.BooleanField(default=True)
        # Where the job's memories go: the user's own (default), or shared with the tenant or a
        # topic (no owning user; the job still runs in the user's turn).
        scope = serializers.ChoiceField(choices=Memory.Scope.choices, default="user")
        topic = serializers.CharField(required=False, default="", allow_blank=True, max_length=200)
        # Seconds to wait for the job to finish before answering (not part of the request).
        wait = serializers.FloatField(required=False, default=0, min_value=0, max_value=MAX_WAIT)

    class ListInput(serializers.Serializer):
        user_id = serializers.UUIDField()
        cursor = serializers.CharField(required=False, max_length=200)  # ours are ~90
        limit = serializers.IntegerField(required=False, default=50, min_value=1, max_value=500)
        # The tenant's shared memories too; and those of the topics named (comma-separated).
        include_shared = serializers.BooleanField(required=False, default=False)
        topics = serializers.CharField(required=False, default="", allow_blank=True)

    @extend_schema(
        operation_id="memory_job_submit",
        request=InputSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: RequestAcceptedOutput,
            200: MemoryRequestOutput,  # with `wait`, when the job finished in time
            **errors(403, 404, 409, 422),
        },
        tags=["memories"],
    )
    def post(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        self.access.user(data["user_id"], write=True)
        key = idempotency_key(request)
        tenant_id = str(self.tenant.id)
        # A job costs its messages (the call paid one already).
        backpressure.rate_limit(tenant_id, cost=len(data["messages"]) - 1)
        backpressure.admit(
            lane_for(MemoryRequest.Kind.MEMORY_JOB, data["priority"]), tenant_id=tenant_id
        )
        _scope_check(data["scope"], data["topic"])
        payload = {
            "messages": [dict(m) for m in data["messages"]],
            "metadata": data["metadata"],
            "agent_id": data["agent_id"],
            "session_id": data["session_id"],
            "infer": data["infer"],
            # Not part of the job's identity (ledger.memory_request_hash): who its changes are by.
            "api_key_id": self.access.key_id,
        }
        if data["scope"] != Memory.Scope.USER:  # a user-scope job's payload (and hash) as before
            payload |= {"scope": data["scope"], "topic": data["topic"]}
            self._scope_write_check(data["scope"], data["topic"])
        memory_request = ledger.memory_request_submit(
            tenant_id=self.tenant.id,
            user_id=data["user_id"],
            payload=payload,
            priority=data["priority"],
            idempotency_key=key,
        )
        return Response(
            {"request_id": str(memory_request.id), "status": memory_request.status},
            status=status.HTTP_202_ACCEPTED,
            headers=_wait_header(data["wait"]),
        )

    @extend_schema(
        operation_id="memory_list",
        parameters=[ListInput, *_LIST_FILTER_PARAMETERS],
        responses={200: MemoryPageOutput, **errors(403, 404)},
        tags=["memories"],
    )
    def get(self, request: Request) -> Response:
        params = request.query_params.dict()
        for name in _JSON_QUERY_FILTERS:
            if name in params:
                try:
                    params[name] = strict_loads(params[name])
                except ValueError as exc:
                    raise InvalidInput(f"{name} must be a JSON object.", field=name) from exc
        data = validated_input(self.ListInput, params)
        filters = memory_filters_parse({k: v for k, v in params.items() if k in FIELDS}, prefix="")
        user = selectors.end_user_get(tenant=self.tenant, user_id=data["user_id"])
        self.user_allowed(user)
        topics = _topics(data["topics"].split(","), field="topics")
        self._shared_read_check(include_shared=data["include_shared"], topics=topics)
        cursor = _decode_cursor(data["cursor"]) if data.get("cursor") else None
        page = selectors.memory_list(
            user=user,
            filters=filters,
            cursor=cursor,
            limit=data["limit"] + 1,
            as_of=_as_of(params.get("as_of")),
            include_shared=data["include_shared"],
            topics=topics,
        )
        has_more = len(page) > data["limit"]
        page = page[: data["limit"]]
        return Response(
            {
                "results": [represented(MemoryOutput, memory) for memory in page],
                "next_cursor": _encode_cursor(page[-1]) if has_more else None,
            }
        )


class BatchItemInput(serializers.Serializer):
    """One bulk write; checked one by one (a bad item is that item's error, not a 400)."""

    action = serializers.ChoiceField(choices=["create", "update", "delete"], default="create")
    id = serializers.UUIDField(required=False, help_text="The memory to update or delete.")
    user_id = serializers.UUIDField(required=False, allow_null=True)
    content = serializers.CharField(required=False)
    type = serializers.ChoiceField(choices=Memory.Type.choices, required=False)
    metadata = serializers.DictField(required=False)
    scope = serializers.ChoiceField(choices=Memory.Scope.choices, required=False)
    topic = serializers.CharField(required=False)
    agent_id = serializers.CharField(required=False)
    session_id = serializers.CharField(required=False)
    occurred_at = serializers.DateTimeField(required=False)


class BatchInput(serializers.Serializer):
    items = BatchItemInput(many=True)
    # `async` is a keyword in Python: the field is named in `get_fields`.
    run_async = serializers.BooleanField(required=False, default=False)

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        fields["async"] = fields.pop("run_async")
        return fields


class BatchItemErrorOutput(serializers.Serializer):
    field = serializers.CharField()
    message = serializers.CharField()


class BatchItemResultOutput(serializers.Serializer):
    index = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["ok", "error"])
    action = serializers.CharField(required=False)
    id = serializers.UUIDField(required=False)
    version = serializers.IntegerField(required=False)
    error = BatchItemErrorOutput(required=False)


class BatchOutput(serializers.Serializer):
    results = BatchItemResultOutput(many=True)
    ok = serializers.IntegerField()
    failed = serializers.IntegerField()


class MemoryBatchApi(TenantApi):
    """Direct bulk writes, no LLM: `{items: [{action, id?, user_id, content, type, metadata}],
    async?}`. Synchronous: per-item results at once. `async: true`: a request id, and the `batch`
    lane writes the items (per-item results then in the request's `events`)."""

    @extend_schema(
        operation_id="memory_batch",
        request=BatchInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            200: BatchOutput,
            202: RequestAcceptedOutput,  # async: true
            **errors(403, 409, 422, 502),
        },
        tags=["memories"],
    )
    def post(self, request: Request) -> Response:
        body = request.data
        if not isinstance(body, dict):
            raise InvalidInput("The body must be a JSON object.", field="body")
        items, run_async = body.get("items"), body.get("async", False)
        if not isinstance(run_async, bool):
            raise InvalidInput("Must be true or false.", field="async")
        limit = settings.BATCH_ASYNC_MAX_ITEMS if run_async else settings.BATCH_MAX_ITEMS
        if not isinstance(items, list) or not items:
            raise InvalidInput("A non-empty list of items is required.", field="items")
        if len(items) > limit:
            raise InvalidInput(f"At most {limit} items per call.", field="items")
        _batch_allowed(self.access, items)
        backpressure.rate_limit(str(self.tenant.id), cost=len(items) - 1)  # one item, one token
        if run_async:
            backpressure.admit(Queue.BATCH, tenant_id=str(self.tenant.id))
            memory_request = ledger.batch_request_submit(
                tenant=self.tenant, items=items, idempotency_key=idempotency_key(request)
            )
            metrics.BATCH_SIZE.observe(len(items))  # of accepted batches only
            return Response(
                {"request_id": str(memory_request.id), "status": memory_request.status},
                status=status.HTTP_202_ACCEPTED,
            )
        metrics.BATCH_SIZE.observe(len(items))
        return self._apply(request, items)

    @idempotent_write  # the asynchronous mode keeps the request ledger's own keys
    def _apply(self, request: Request, items: list[Any]) -> Response:
        with backpressure.embedding_slot():
            results = memories_batch_apply(
                tenant=self.tenant,
                raw_items=items,
                embedder=get_embedder(),
                actor_key_id=self.access.key_id,
            )
        failed = sum(result["status"] == "error" for result in results)
        return Response({"results": results, "ok": len(results) - failed, "failed": failed})


def _topics(names: list[str], *, field: str) -> tuple[str, ...]:
    topics = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    if any(len(name) > 200 for name in topics):
        raise InvalidInput("A topic has at most 200 characters.", field=field)
    return topics


def _scope_check(scope: str, topic: str) -> None:
    if (scope == Memory.Scope.TOPIC) != bool(topic):
        raise InvalidInput("scope topic needs a topic, and only it takes one.", field="topic")


def _batch_allowed(access: Access, items: list[Any]) -> None:
    """The key may write every item's user (and scope, for a shared item): 403 otherwise. Items
    that are not objects are left to the batch, which answers them one by one."""
    if access.is_admin:
        return
    objects = [item for item in items if isinstance(item, dict)]
    access.users([item.get("user_id") for item in objects], write=True)
    for item in objects:
        if item.get("scope") == "tenant":
            access.shared(write=True)
        elif item.get("scope") == "topic" and isinstance(item.get("topic"), str):
            access.topic(item["topic"], write=True)


class MemoryRequestListOutput(serializers.Serializer):
    results = MemoryRequestOutput(many=True)


class MemoryRequestListApi(TenantApi):
    """`GET /v1/requests?status=failure`: the dead-letter list (last error, attempts), newest
    first; page with `before=<created_at of the last one>`."""

    class InputSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=MemoryRequest.Status.choices, required=False)
        user_id = serializers.UUIDField(required=False)
        before = serializers.DateTimeField(required=False)
        limit = serializers.IntegerField(default=100, min_value=1, max_value=500)

    @extend_schema(
        operation_id="request_list",
        parameters=[InputSerializer],
        responses={200: MemoryRequestListOutput, **errors(403)},
        tags=["requests"],
    )
    def get(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.query_params.dict())
        if data.get("user_id"):
            self.access.user(data["user_id"])
        else:  # every user's requests
            self.access.admin()
        requests = selectors.memory_request_list(
            tenant=self.tenant,
            status=data.get("status"),
            user_id=data.get("user_id"),
            before=data.get("before"),
            limit=data["limit"],
        )
        return Response({"results": [represented(MemoryRequestOutput, r) for r in requests]})


class MemoryRequestStatusApi(TenantApi):
    """`GET /v1/requests/{id}[?wait=<seconds>]`: the request's status; with `wait`, answered
    when it finishes or the wait runs out (memories.request_waits)."""

    class QuerySerializer(serializers.Serializer):
        wait = serializers.FloatField(required=False, default=0, min_value=0, max_value=MAX_WAIT)

    @extend_schema(
        operation_id="request_status",
        parameters=[QuerySerializer],
        responses={200: MemoryRequestOutput, **errors(403, 404)},
        tags=["requests"],
    )
    def get(self, request: Request, request_id: str) -> Response:
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        memory_request = selectors.memory_request_get(tenant=self.tenant, request_id=request_id)
        # A bulk write's request has no user: its status is any key's to poll (its results name
        # memory ids and statuses, no content).
        if memory_request.user_id is not None:
            self.access.user(memory_request.user_id)
        finished = memory_request.status in (
            MemoryRequest.Status.SUCCESS,
            MemoryRequest.Status.FAILURE,
        )
        return Response(
            represented(MemoryRequestOutput, memory_request),
            headers={} if finished else _wait_header(query["wait"]),
        )


# --- Memories ------------------------------------------------------------------------------------


class ClockField(serializers.DictField):
    """A vector clock: {agent_id: count}, counts whole and not negative."""

    child = serializers.IntegerField(min_value=0)

    def to_internal_value(self, data: Any) -> dict[str, int]:
        clock = super().to_internal_value(data)
        if len(clock) > 1000 or any(len(agent) > 200 for agent in clock):
            raise serializers.ValidationError("At most 1000 agents of 200 characters each.")
        return clock


class MemoryDetailApi(TenantApi):
    class UpdateInput(serializers.Serializer):
        content = serializers.CharField(
            required=False, max_length=settings.MEMORY_MAX_CONTENT_CHARS
        )
        metadata = JsonObjectField(required=False)
        occurred_at = serializers.DateTimeField(required=False)
        agent_id = serializers.CharField(required=False, allow_blank=True, max_length=200)
        # What the write was based on (If-Match says the version too), and whether a stale base
        # merges (last writer wins) instead of failing with 412.
        base_version = serializers.IntegerField(required=False, min_value=1)
        base_clock = ClockField(required=False)
        merge = serializers.BooleanField(default=False)
        # A write queued offline: when the client made it (never later than now).
        written_at = serializers.DateTimeField(required=False)
        # A list's changes, a counter's.
        add = serializers.ListField(child=serializers.JSONField(), required=False, max_length=1000)
        remove = serializers.ListField(
            child=serializers.JSONField(), required=False, max_length=1000
        )
        increment = serializers.IntegerField(required=False, min_value=-(10**12), max_value=10**12)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            changes = ("content", "metadata", "occurred_at", "add", "remove", "increment")
            if not any(name in attrs for name in changes):
                message = "Give content, metadata, occurred_at, add, remove or increment."
                raise serializers.ValidationError({"content": [message]})
            return attrs

    @extend_schema(
        operation_id="memory_get",
        responses={200: MemoryOutput, **errors(403, 404)},
        tags=["memories"],
    )
    def get(self, request: Request, memory_id: str) -> Response:
        memory = selectors.memory_get(tenant=self.tenant, memory_id=memory_id)
        self.access.memory(memory)
        return Response(represented(MemoryOutput, memory), headers={"ETag": f'"{memory.version}"'})

    @extend_schema(
        operation_id="memory_update",
        request=UpdateInput,
        parameters=[IDEMPOTENCY_KEY, IF_MATCH],
        responses={200: MemoryOutput, **errors(403, 404, 409, 412, 422, 502)},
        tags=["memories"],
    )
    @idempotent_write
    def patch(self, request: Request, memory_id: str) -> Response:
        data = validated_input(self.UpdateInput, request.data)
        base_version = _if_match_version(request) or data.get("base_version")
        change = versioned_writes.Change(
            content=data.get("content"),
            metadata=data.get("metadata"),
            occurred_at=data.get("occurred_at"),
            list_add=data.get("add"),
            list_remove=data.get("remove"),
            increment=data.get("increment"),
            base_version=base_version,
            base_clock=data.get("base_clock"),
            merge=data["merge"],
            written_at=data.get("written_at"),
        )
        with backpressure.embedding_slot():
            memory = versioned_writes.memory_change(
                tenant_id=self.tenant.id,
                memory_id=memory_id,
                change=change,
                actor=self.actor(data.get("agent_id")),
                embedder=get_embedder(),
                may_write=partial(self._memory_check, write=True),
            )
        return Response(represented(MemoryOutput, memory), headers={"ETag": f'"{memory.version}"'})

    @extend_schema(
        operation_id="memory_delete",
        parameters=[IDEMPOTENCY_KEY],
        responses={204: None, **errors(403, 404, 422)},
        tags=["memories"],
    )
    @idempotent_write
    def delete(self, request: Request, memory_id: str) -> Response:
        self.memory_allowed(memory_id, write=True)
        actor = self.actor()
        erasure.memory_forget(
            tenant_id=self.tenant.id,
            memory_id=memory_id,
            actor=actor.agent_id or "api",
            actor_key_id=actor.key_id,
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


def _if_match_version(request: Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    # ASCII digits only ("²" is a digit to isdigit(), not to int()), and few enough for int().
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidInput("If-Match must be a memory version number.", field="If-Match")
    return int(value)


class MemoryDirectApi(TenantApi):
    """`POST /v1/memories/direct`: one memory written as given (no LLM), in any scope -> 201."""

    class InputSerializer(serializers.Serializer):
        user_id = serializers.UUIDField(required=False, allow_null=True, default=None)
        content = serializers.CharField(max_length=settings.MEMORY_MAX_CONTENT_CHARS)
        type = serializers.ChoiceField(choices=Memory.Type.choices, default="fact")
        scope = serializers.ChoiceField(choices=Memory.Scope.choices, default="user")
        topic = serializers.CharField(required=False, default="", allow_blank=True, max_length=200)
        metadata = JsonObjectField(required=False, default=dict)
        agent_id = serializers.CharField(required=False, allow_blank=True, max_length=200)
        session_id = serializers.CharField(
            required=False, default="", allow_blank=True, max_length=200
        )
        occurred_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
        merge = serializers.ChoiceField(choices=Memory.MergeRule.choices, default="lww")
        items = serializers.ListField(
            child=serializers.JSONField(), required=False, allow_null=True, max_length=1000
        )
        value = serializers.IntegerField(
            required=False, allow_null=True, min_value=-(10**12), max_value=10**12
        )

    @extend_schema(
        operation_id="memory_direct_create",
        request=InputSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: MemoryOutput, **errors(403, 404, 422, 502)},
        tags=["memories"],
    )
    @idempotent_write
    def post(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        _scope_check(data["scope"], data["topic"])
        user = None
        if data["user_id"] is not None:
            user = selectors.end_user_get(tenant=self.tenant, user_id=data["user_id"])
        self._scope_write_check(data["scope"], data["topic"], user)
        with backpressure.embedding_slot():
            memory = versioned_writes.memory_direct_create(
                tenant=self.tenant,
                user=user,
                content=data["content"],
                memory_type=data["type"],
                scope=data["scope"],
                topic=data["topic"],
                metadata=data["metadata"],
                actor=self.actor(data.get("agent_id")),
                embedder=get_embedder(),
                occurred_at=data["occurred_at"],
                merge_rule=data["merge"],
                items=data.get("items"),
                value=data.get("value"),
                session_id=data["session_id"],
            )
        return Response(
            represented(MemoryOutput, memory),
            status=status.HTTP_201_CREATED,
            headers={"ETag": f'"{memory.version}"'},
        )


class ConflictOutput(serializers.Serializer):
    id = serializers.UUIDField()
    memory_id = serializers.UUIDField()
    status = serializers.CharField()
    current = serializers.JSONField()
    incoming = serializers.JSONField()
    created_at = serializers.DateTimeField()
    resolved_at = serializers.DateTimeField(allow_null=True)
    resolution = serializers.JSONField(allow_null=True)


class ConflictPageOutput(serializers.Serializer):
    results = ConflictOutput(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class ConflictResolvedOutput(serializers.Serializer):
    conflict = ConflictOutput()
    memory = MemoryOutput()


class ConflictListApi(TenantApi):
    """`GET /v1/conflicts[?status=open|resolved][&memory_id=]`: newest first, paginated."""

    class QuerySerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=MemoryConflict.Status.choices, default="open")
        memory_id = serializers.UUIDField(required=False)
        cursor = serializers.CharField(required=False, max_length=200)
        limit = serializers.IntegerField(required=False, default=50, min_value=1, max_value=500)

    @extend_schema(
        operation_id="conflict_list",
        parameters=[QuerySerializer],
        responses={200: ConflictPageOutput, **errors(403, 404)},
        tags=["conflicts"],
    )
    def get(self, request: Request) -> Response:
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        if query.get("memory_id"):  # one memory's: whoever may read it; all of them: an admin
            memory = selectors.memory_get(tenant=self.tenant, memory_id=query["memory_id"])
            self._memory_check(memory, write=False)
        else:
            self.access.admin()
        page = selectors.conflict_list(
            tenant=self.tenant,
            status=query["status"],
            memory_id=query.get("memory_id"),
            before=_decode_cursor(query["cursor"]) if query.get("cursor") else None,
            limit=query["limit"] + 1,
        )
        has_more = len(page) > query["limit"]
        page = page[: query["limit"]]
        return Response(
            {
                "results": [represented(ConflictOutput, conflict) for conflict in page],
                "next_cursor": _encode_cursor(page[-1]) if has_more else None,
            }
        )


class ConflictResolveApi(TenantApi):
    """`POST /v1/conflicts/{id}/resolve {"choose": "current"|"incoming"} | {"content": ...}`."""

    class InputSerializer(serializers.Serializer):
        choose = serializers.ChoiceField(choices=["current", "incoming"], required=False)
        content = serializers.CharField(
            required=False, max_length=settings.MEMORY_MAX_CONTENT_CHARS
        )
        agent_id = serializers.CharField(required=False, allow_blank=True, max_length=200)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if ("choose" in attrs) == ("content" in attrs):
                message = "Give either choose (current or incoming) or content."
                raise serializers.ValidationError({"choose": [message]})
            return attrs

    @extend_schema(
        operation_id="conflict_resolve",
        request=InputSerializer,
        responses={200: ConflictResolvedOutput, **errors(403, 404, 409, 502)},
        tags=["conflicts"],
    )
    @idempotent_write
    def post(self, request: Request, conflict_id: str) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        conflict = selectors.conflict_get(tenant=self.tenant, conflict_id=conflict_id)
        self._memory_check(
            selectors.memory_get(tenant=self.tenant, memory_id=conflict.memory_id), write=True
        )
        with backpressure.embedding_slot():
            conflict, memory = versioned_writes.conflict_resolve(
                tenant_id=self.tenant.id,
                conflict_id=conflict_id,
                choose=data.get("choose"),
                content=data.get("content"),
                actor=self.actor(data.get("agent_id")),
                embedder=get_embedder(),
            )
        return Response(
            {
                "conflict": represented(ConflictOutput, conflict),
                "memory": represented(MemoryOutput, memory),
            }
        )


class HistoryEntryOutput(serializers.Serializer):
    event = serializers.CharField()
    old_content = serializers.CharField(allow_null=True)
    new_content = serializers.CharField(allow_null=True)
    # new_content held from valid_from until valid_to (the next entry's time; null: still).
    valid_from = serializers.DateTimeField(source="occurred_at")
    valid_to = serializers.DateTimeField(allow_null=True)
    reason = serializers.CharField(allow_null=True)  # why a CLOSE happened
    actor = serializers.CharField()
    actor_key_id = serializers.UUIDField(allow_null=True)
    request_id = serializers.UUIDField(allow_null=True)
    created_at = serializers.DateTimeField()


class MemoryHistoryApi(TenantApi):
    OutputSerializer = HistoryEntryOutput

    class QuerySerializer(serializers.Serializer):
        limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=500)
        cursor = serializers.RegexField(r"^\d{1,18}$", required=False)

    class PageOutput(serializers.Serializer):
        memory_id = serializers.UUIDField()
        history = HistoryEntryOutput(many=True)
        next_cursor = serializers.CharField(allow_null=True)

    @extend_schema(
        operation_id="memory_history",
        parameters=[QuerySerializer],
        responses={200: PageOutput, **errors(403, 404)},
        tags=["memories"],
    )
    def get(self, request: Request, memory_id: str) -> Response:
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        after = int(query["cursor"]) if query.get("cursor") else None
        self.memory_allowed(memory_id)
        page = selectors.memory_history(
            tenant=self.tenant, memory_id=memory_id, after=after, limit=query["limit"] + 1
        )
        has_more = len(page) > query["limit"]
        page = page[: query["limit"]]
        return Response(
            {
                "memory_id": memory_id,
                "history": self.OutputSerializer(page, many=True).data,
                "next_cursor": str(page[-1].id) if has_more else None,
            }
        )


class SearchResultOutput(MemoryOutput):
    score = serializers.FloatField()
    similarity = serializers.FloatField(allow_null=True)
    why = serializers.DictField(child=serializers.IntegerField())


class MemorySearchApi(TenantApi):
    """Hybrid (default), vector or keyword search of one user's live memories; each result
    carries `score` (fused, 0 to 1), `similarity` (cosine) and `why` (each retriever's rank)."""

    class InputSerializer(serializers.Serializer):
        user_id = serializers.UUIDField()
        query = serializers.CharField(max_length=settings.MEMORY_MAX_CONTENT_CHARS)
        limit = serializers.IntegerField(default=10, min_value=1, max_value=100)
        filters = serializers.JSONField(required=False, default=dict)  # memories.filters
        # What was true then (ISO 8601): memories closed since come back, with their old content.
        as_of = serializers.DateTimeField(required=False, allow_null=True, default=None)
        # Halve a memory's score for every so many days since it happened (off when absent).
        recency_half_life_days = serializers.FloatField(
            required=False, allow_null=True, default=None, min_value=0.001, max_value=1e6
        )
        mode = serializers.ChoiceField(choices=search.MODES, default="hybrid")
        # A minimum cosine similarity (-1 to 1), as before hybrid search; min_score: a minimum
        # fused score (0 to 1).
        threshold = serializers.FloatField(
            required=False, allow_null=True, min_value=-1, max_value=1
        )
        min_score = serializers.FloatField(
            required=False, allow_null=True, min_value=0, max_value=1
        )
        # The tenant's shared memories too; and those of the topics named.
        include_shared = serializers.BooleanField(default=False)
        topics = serializers.ListField(
            child=serializers.CharField(max_length=200), required=False, default=list, max_length=50
        )

    class ResultsOutput(serializers.Serializer):
        results = SearchResultOutput(many=True)

    @extend_schema(
        operation_id="memory_search",
        request=InputSerializer,
        responses={200: ResultsOutput, **errors(403, 404, 502)},
        tags=["memories"],
    )
    def post(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        topics = _topics(data["topics"], field="topics")
        self._shared_read_check(include_shared=data["include_shared"], topics=topics)
        # The user is read inside the search's statement; the key's right to it (an admin's
        # is whole) is checked with its creator before anything is shown or recorded.
        access = self.access
        user = search.UnreadUser(
            tenant_id=self.tenant.id,
            id=data["user_id"],
            check=None
            if access.is_admin
            else lambda creator: access.user(data["user_id"], created_by_key_id=creator),
        )
        with backpressure.embedding_slot():
            found = search.memory_search(
                user=user,
                query=data["query"],
                limit=data["limit"],
                filters=memory_filters_parse(data["filters"]),
                threshold=data.get("threshold"),
                min_score=data.get("min_score"),
                mode=data["mode"],
                embedder=get_embedder(),
                as_of=data["as_of"],
                recency_half_life_days=data["recency_half_life_days"],
                include_shared=data["include_shared"],
                topics=topics,
            )
        zone = timezone.get_current_timezone()
        results = [
            {
                **memory_output_of_row(f.memory, zone=zone),
                "score": f.score,
                "similarity": None if f.similarity is None else round(f.similarity, 6),
                "why": f.why,
            }
            for f in found
        ]
        return Response({"results": results})


# --- Health --------------------------------------------------------------------------------------


def healthz(request: Any) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: Any) -> JsonResponse:
    """Ready when PostgreSQL and the broker both answer."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception:  # readiness reports, it does not raise; the why goes to the log
        logger.exception("readiness: the database does not answer")
        checks["database"] = "unavailable"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        checks["broker"] = "ok"
    except Exception:
        logger.exception("readiness: the broker does not answer")
        checks["broker"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503
    )


def metrics_view(request: Any) -> HttpResponse:
    """Every process's metrics (summed from PROMETHEUS_MULTIPROC_DIR when set), then the queue
    depths, read now. With METRICS_TOKEN set it wants `Authorization: Bearer <token>`; without
    it, only a client on loopback is answered (a scraper next to the service)."""
    if settings.METRICS_TOKEN:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.METRICS_TOKEN.encode()):
            body = {
                "error": "not_authenticated",
                "message": "Give Authorization: Bearer <METRICS_TOKEN>.",
            }
            return JsonResponse(body, status=401)
    elif not ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "0.0.0.0").is_loopback:
        body = {"error": "forbidden", "message": "Set METRICS_TOKEN to scrape from elsewhere."}
        return JsonResponse(body, status=403)
    registry = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    output = prometheus_client.generate_latest(registry)
    depth_registry = prometheus_client.CollectorRegistry()
    depth_registry.register(QueueDepthCollector())
    output += prometheus_client.generate_latest(depth_registry)
    return HttpResponse(output, content_type=prometheus_client.CONTENT_TYPE_LATEST)
