"""HTTP for what happened: sessions and their timelines, event replay, analytics, pull-sync."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from uuid import UUID

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from memories import selectors, sessions
from memories.api import JsonObjectField, MemoryOutput, MessageInput, TenantApi, validated_input
from memories.errors import Gone, InvalidInput
from memories.events import EVENT_TYPES
from memories.events.analytics import analytics_summary
from memories.events.replay import events_in_range, session_events, session_reconstruct
from memories.openapi import EventOutput, errors
from memories.providers.wiring import get_llm


class SessionOutput(serializers.Serializer):
    session_id = serializers.UUIDField(source="id")
    user_id = serializers.UUIDField()
    agent_id = serializers.CharField()
    metadata = serializers.JSONField()
    summary = serializers.CharField()
    started_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True)


class SessionCreateApi(TenantApi):
    class InputSerializer(serializers.Serializer):
        user_id = serializers.UUIDField()
        agent_id = serializers.CharField(
            required=False, default="", allow_blank=True, max_length=200
        )
        metadata = JsonObjectField(required=False, default=dict)

    @extend_schema(
        operation_id="session_create",
        request=InputSerializer,
        responses={201: SessionOutput, **errors(403, 404)},
        tags=["sessions"],
    )
    def post(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        user = selectors.end_user_get(tenant=self.tenant, user_id=data["user_id"])
        self.user_allowed(user, write=True)
        session = sessions.session_start(
            user=user, agent_id=data["agent_id"], metadata=data["metadata"]
        )
        return Response(SessionOutput(session).data, status=status.HTTP_201_CREATED)


class SessionDetailApi(TenantApi):
    @extend_schema(
        operation_id="session_get",
        responses={200: SessionOutput, **errors(403, 404)},
        tags=["sessions"],
    )
    def get(self, request: Request, session_id: str) -> Response:
        session = selectors.session_get(tenant=self.tenant, session_id=session_id)
        self.access.user(session.user_id)
        return Response(SessionOutput(session).data)


class MessageOutput(serializers.Serializer):
    id = serializers.IntegerField()
    role = serializers.CharField()
    content = serializers.CharField()
    created_at = serializers.DateTimeField()


class SessionMessagesApi(TenantApi):
    """`POST` appends messages; `GET ?cursor=&limit=` reads them back, oldest first."""

    class InputSerializer(serializers.Serializer):
        # many=True: the ListSerializer takes max_length; the stub types only the child's kwargs.
        messages = MessageInput(many=True, allow_empty=False, max_length=200)  # type: ignore[call-arg]

    class QuerySerializer(serializers.Serializer):
        cursor = serializers.RegexField(r"^\d{1,18}$", required=False)
        limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=500)

    class PageOutput(serializers.Serializer):
        session_id = serializers.UUIDField()
        messages = MessageOutput(many=True)
        next_cursor = serializers.CharField(allow_null=True)

    class AddedOutput(serializers.Serializer):
        session_id = serializers.UUIDField()
        added = serializers.IntegerField()

    @extend_schema(
        operation_id="session_messages",
        parameters=[QuerySerializer],
        responses={200: PageOutput, **errors(403, 404)},
        tags=["sessions"],
    )
    def get(self, request: Request, session_id: str) -> Response:
        query = validated_input(self.QuerySerializer, request.query_params.dict())
        session = selectors.session_get(tenant=self.tenant, session_id=session_id)
        self.access.user(session.user_id)
        page = selectors.session_messages(
            session=session,
            after=int(query["cursor"]) if query.get("cursor") else None,
            limit=query["limit"] + 1,
        )
        has_more = len(page) > query["limit"]
        page = page[: query["limit"]]
        return Response(
            {
                "session_id": str(session.id),
                "messages": MessageOutput(page, many=True).data,
                "next_cursor": str(page[-1].id) if has_more else None,
            }
        )

    @extend_schema(
        operation_id="session_messages_add",
        request=InputSerializer,
        responses={201: AddedOutput, **errors(403, 404, 409)},
        tags=["sessions"],
    )
    def post(self, request: Request, session_id: str) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        session = selectors.session_get(tenant=self.tenant, session_id=session_id)
        self.access.user(session.user_id, write=True)
        added = sessions.session_add_messages(
            session=session, messages=[dict(m) for m in data["messages"]]
        )
        return Response({"session_id": str(session.id), "added": len(added)}, status=201)


class SessionEndApi(TenantApi):
    class InputSerializer(serializers.Serializer):
        summarize = serializers.BooleanField(default=False)

    @extend_schema(
        operation_id="session_end",
        request=InputSerializer,
        responses={200: SessionOutput, **errors(403, 404, 502)},
        tags=["sessions"],
    )
    def post(self, request: Request, session_id: str) -> Response:
        data = validated_input(self.InputSerializer, request.data)
        session = selectors.session_get(tenant=self.tenant, session_id=session_id)
        self.access.user(session.user_id, write=True)
        session = sessions.session_end(
            session=session,
            summarize=data["summarize"],
            llm=get_llm() if data["summarize"] else None,
        )
        return Response(SessionOutput(session).data)


class EventsQuery(serializers.Serializer):
    user_id = serializers.UUIDField(required=False)
    session_id = serializers.CharField(required=False, max_length=200)
    type = serializers.CharField(required=False)
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)
    # A stream id; 19 digits a part at most, so that each fits Redis's 64 bits.
    after = serializers.RegexField(r"^\d{1,19}-\d{1,19}$", required=False)
    limit = serializers.IntegerField(required=False, default=500, min_value=1, max_value=5000)

    def validate_type(self, value: str) -> list[str]:
        types = [t for t in value.split(",") if t]
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise serializers.ValidationError(f"Unknown event types: {', '.join(unknown)}.")
        return types


class EventsApi(TenantApi):
    """Replay and time travel: the tenant's events in a time window, oldest first."""

    class PageOutput(serializers.Serializer):
        events = EventOutput(many=True)
        next_after = serializers.CharField(allow_null=True)

    @extend_schema(
        operation_id="events_list",
        parameters=[EventsQuery],
        responses={200: PageOutput, **errors(403, 404, 410)},
        tags=["events"],
    )
    def get(self, request: Request) -> Response:
        data = validated_input(EventsQuery, request.query_params.dict())
        if data.get("user_id"):
            self.access.user(data["user_id"])
        else:  # the whole tenant's events
            self.access.admin()
        events = events_in_range(
            tenant_id=str(self.tenant.id),
            since=data.get("since"),
            until=data.get("until"),
            user_id=str(data["user_id"]) if data.get("user_id") else None,
            session_id=data.get("session_id"),
            event_types=data.get("type"),
            after_id=data.get("after"),
            limit=data["limit"],
        )
        next_after = events[-1]["id"] if len(events) == data["limit"] else None
        return Response({"events": events, "next_after": next_after})


def _session_events(view: TenantApi, session_id: str) -> tuple[Any, list[dict[str, Any]]]:
    session = selectors.session_get(tenant=view.tenant, session_id=session_id)
    view.access.user(session.user_id)
    return session, session_events(tenant_id=str(view.tenant.id), session=session)


class TimelineEntryOutput(serializers.Serializer):
    id = serializers.CharField(allow_null=True)
    timestamp = serializers.DateTimeField()
    event_type = serializers.CharField()
    data = serializers.DictField()  # type: ignore[assignment]  # a field
    memory = serializers.DictField(allow_null=True)


class SessionTimelineApi(TenantApi):
    class TimelineOutput(serializers.Serializer):
        session_id = serializers.UUIDField()
        timeline = TimelineEntryOutput(many=True)

    @extend_schema(
        operation_id="session_timeline",
        responses={200: TimelineOutput, **errors(403, 404)},
        tags=["sessions"],
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, events = _session_events(self, session_id)
        timeline = [
            {
                "id": e["id"],
                "timestamp": e["timestamp"],
                "event_type": e["event_type"],
                "data": e["data"],
                "memory": e["memory"],
            }
            for e in events
        ]
        return Response({"session_id": str(session.id), "timeline": timeline})


class ReconstructedMessageOutput(serializers.Serializer):
    role = serializers.CharField(allow_null=True)
    content = serializers.CharField(allow_null=True)
    at = serializers.DateTimeField()


class ReconstructedChangeOutput(serializers.Serializer):
    event = serializers.CharField()
    memory_id = serializers.UUIDField(allow_null=True)
    content = serializers.CharField(allow_null=True)


class SessionReconstructApi(TenantApi):
    class StateOutput(serializers.Serializer):
        session_id = serializers.UUIDField()
        started_at = serializers.DateTimeField(allow_null=True)
        ended_at = serializers.DateTimeField(allow_null=True)
        agent_id = serializers.CharField(allow_blank=True)
        messages = ReconstructedMessageOutput(many=True)
        summary = serializers.CharField(allow_null=True)
        searches = serializers.IntegerField()
        memory_changes = ReconstructedChangeOutput(many=True)
        errors = serializers.IntegerField()  # type: ignore[assignment]  # a field
        events = serializers.IntegerField()

    @extend_schema(
        operation_id="session_reconstruct",
        responses={200: StateOutput, **errors(403, 404)},
        tags=["sessions"],
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, events = _session_events(self, session_id)
        return Response({"session_id": str(session.id), **session_reconstruct(events)})


class AnalyticsApi(TenantApi):
    """Counters kept by the `analytics` consumer group: totals, events/s, error rate, sessions."""

    class SummaryOutput(serializers.Serializer):
        total_events = serializers.IntegerField()
        by_type = serializers.DictField(child=serializers.IntegerField())
        top_event_types = serializers.ListField(
            child=serializers.ListField(child=serializers.JSONField(), min_length=2, max_length=2),
            help_text="`[event_type, count]` pairs, most frequent first.",
        )
        events_per_second = serializers.FloatField()
        error_rate = serializers.FloatField()
        active_sessions = serializers.IntegerField()

    @extend_schema(
        operation_id="analytics_events",
        responses={200: SummaryOutput, **errors(403)},
        tags=["events"],
    )
    def get(self, request: Request) -> Response:
        self.access.admin()
        return Response(analytics_summary(str(self.tenant.id)))


# --- Pull-sync -----------------------------------------------------------------------------------


def _encode_sync_cursor(txid: int, memory_id: object) -> str:
    return base64.urlsafe_b64encode(f"{txid}:{memory_id}".encode()).decode()


def _decode_sync_cursor(cursor: str) -> tuple[int, str]:
    try:
        txid, memory_id = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
        serializers.UUIDField().to_internal_value(memory_id)
        return int(txid), memory_id
    except (ValueError, binascii.Error, serializers.ValidationError) as exc:
        raise InvalidInput("Malformed cursor.", field="since") from exc


class SyncQuery(serializers.Serializer):
    """Which memories a pull-sync covers: `user_id` (with `include_shared` and `topics`), or
    `scope=tenant`, or `topic`."""

    user_id = serializers.UUIDField(required=False)
    include_shared = serializers.BooleanField(required=False, default=False)
    topics = serializers.CharField(required=False, allow_blank=True, max_length=10_000)
    scope = serializers.ChoiceField(choices=["user", "tenant"], required=False)
    topic = serializers.CharField(required=False, max_length=200)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        named = [
            attrs.get("user_id") is not None,
            attrs.get("scope") == "tenant",
            attrs.get("topic") is not None,
        ]
        if sum(named) != 1:
            message = "Give one of user_id, scope=tenant or topic."
            raise serializers.ValidationError({"user_id": [message]})
        topics = [name.strip() for name in attrs.get("topics", "").split(",") if name.strip()]
        if topics and attrs.get("user_id") is None:
            raise serializers.ValidationError({"topics": ["Only with user_id."]})
        attrs["topics"] = topics
        return attrs


class SyncApiBase(TenantApi):
    def sync_sets(self, data: dict[str, Any]) -> dict[str, Any]:
        """The selectors' arguments for the sets the query names, each checked against the
        key's rights (a user of another tenant is a 404)."""
        if data.get("topic") is not None:
            self.access.topic(data["topic"])
            return {"tenant": self.tenant, "topics": [data["topic"]]}
        if data.get("scope") == "tenant":
            self.access.shared()
            return {"tenant": self.tenant, "shared": True}
        user = selectors.end_user_get(tenant=self.tenant, user_id=data["user_id"])
        self.user_allowed(user)
        if data["include_shared"]:
            self.access.shared()
        for topic in data["topics"]:
            self.access.topic(topic)
        return {"user": user, "shared": data["include_shared"], "topics": data["topics"]}


class SyncChangeOutput(MemoryOutput):
    deleted = serializers.SerializerMethodField()
    deleted_at = serializers.DateTimeField(allow_null=True)
    # Contradicted: no longer true (valid_to says since when), out of the live set.
    closed = serializers.SerializerMethodField()

    def get_deleted(self, memory: Any) -> bool:
        return memory.deleted_at is not None

    def get_closed(self, memory: Any) -> bool:
        return memory.valid_to is not None


class SyncApi(SyncApiBase):
    """`GET /v1/sync?user_id=[&include_shared=true][&topics=a,b] | scope=tenant | topic=`
    `&since=CURSOR&limit=`: every change of those memories since the cursor (one cursor over
    their union), deletions as tombstones (`deleted: true`), contradicted memories as `closed:
    true`, and the cursor to send next time. A cursor from before tombstones that were purged
    (SYNC_TOMBSTONE_RETENTION_DAYS) is `410 cursor_expired`, with the `snapshot` to start from."""

    class InputSerializer(SyncQuery):
        since = serializers.CharField(required=False, allow_blank=True)
        limit = serializers.IntegerField(required=False, default=500, min_value=1, max_value=1000)

    ChangeOutput = SyncChangeOutput

    class PageOutput(serializers.Serializer):
        changes = SyncChangeOutput(many=True)
        next_cursor = serializers.CharField(allow_blank=True)
        has_more = serializers.BooleanField()

    @extend_schema(
        operation_id="sync",
        parameters=[InputSerializer],
        responses={200: PageOutput, **errors(403, 404, 410)},
        tags=["sync"],
    )
    def get(self, request: Request) -> Response:
        data = validated_input(self.InputSerializer, request.query_params.dict())
        sets = self.sync_sets(data)
        cursor = _decode_sync_cursor(data["since"]) if data.get("since") else None
        if cursor is not None:
            purged = selectors.sync_purged_through(tenant_id=self.tenant.id)
            if purged is not None and (cursor[0], UUID(cursor[1])) < purged:
                query = request.query_params.copy()
                query.pop("since", None)
                raise Gone(
                    "Deletions after this cursor were purged; rebuild from the snapshot, then "
                    "sync on from its next_cursor.",
                    snapshot=f"/v1/sync?{query.urlencode()}",
                )
        changes = selectors.memory_changes_since(cursor=cursor, limit=data["limit"], **sets)
        if changes:
            last = changes[-1]
            assert last.change_txid is not None  # a trigger sets it on every write
            next_cursor = _encode_sync_cursor(last.change_txid, last.id)
        else:
            next_cursor = data.get("since") or ""
        return Response(
            {
                "changes": self.ChangeOutput(changes, many=True).data,
                "next_cursor": next_cursor,
                "has_more": len(changes) == data["limit"],
            }
        )


class SyncDigestApi(SyncApiBase):
    """`GET /v1/sync/digest?<the sets, as /v1/sync>` -> `{count, hash}`: how many live memories
    (not deleted, not closed) and the sha256 hex of their `id:version` lines, sorted by id, joined
    by newlines; a cache that computes the same holds the same."""

    class DigestOutput(serializers.Serializer):
        count = serializers.IntegerField()
        hash = serializers.CharField(help_text="sha256 hex of the sorted `id:version` lines.")

    @extend_schema(
        operation_id="sync_digest",
        parameters=[SyncQuery],
        responses={200: DigestOutput, **errors(403, 404)},
        tags=["sync"],
    )
    def get(self, request: Request) -> Response:
        data = validated_input(SyncQuery, request.query_params.dict())
        count, digest = selectors.memory_digest(**self.sync_sets(data))
        return Response({"count": count, "hash": digest})
