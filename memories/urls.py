from django.urls import path

from memories import api, api_access, api_errors, api_events

urlpatterns = [
    path("v1/users", api.UserCreateApi.as_view(), name="user-create"),
    path("create/user", api.UserCreateApi.as_view(), name="user-create-alias"),
    path("v1/users/<uuid:user_id>", api.UserDetailApi.as_view(), name="user-detail"),
    path("v1/memories", api.MemoryCollectionApi.as_view(), name="memories"),
    path("v1/memories/search", api.MemorySearchApi.as_view(), name="memory-search"),
    path("v1/memories/batch", api.MemoryBatchApi.as_view(), name="memory-batch"),
    path("v1/memories/direct", api.MemoryDirectApi.as_view(), name="memory-direct"),
    path("v1/conflicts", api.ConflictListApi.as_view(), name="conflicts"),
    path(
        "v1/conflicts/<uuid:conflict_id>/resolve",
        api.ConflictResolveApi.as_view(),
        name="conflict-resolve",
    ),
    path("v1/memories/<uuid:memory_id>", api.MemoryDetailApi.as_view(), name="memory-detail"),
    path(
        "v1/memories/<uuid:memory_id>/history",
        api.MemoryHistoryApi.as_view(),
        name="memory-history",
    ),
    path("v1/requests", api.MemoryRequestListApi.as_view(), name="requests"),
    path("v1/requests/<uuid:request_id>", api.MemoryRequestStatusApi.as_view(), name="request"),
    path(
        "get_status/<uuid:request_id>", api.MemoryRequestStatusApi.as_view(), name="request-alias"
    ),
    path("v1/sessions", api_events.SessionCreateApi.as_view(), name="sessions"),
    path("v1/sessions/<uuid:session_id>", api_events.SessionDetailApi.as_view(), name="session"),
    path(
        "v1/sessions/<uuid:session_id>/messages",
        api_events.SessionMessagesApi.as_view(),
        name="session-messages",
    ),
    path(
        "v1/sessions/<uuid:session_id>/end", api_events.SessionEndApi.as_view(), name="session-end"
    ),
    path(
        "v1/sessions/<uuid:session_id>/timeline",
        api_events.SessionTimelineApi.as_view(),
        name="session-timeline",
    ),
    path(
        "v1/sessions/<uuid:session_id>/reconstruct",
        api_events.SessionReconstructApi.as_view(),
        name="session-reconstruct",
    ),
    path("v1/events", api_events.EventsApi.as_view(), name="events"),
    path("v1/analytics/events", api_events.AnalyticsApi.as_view(), name="analytics"),
    path("v1/sync", api_events.SyncApi.as_view(), name="sync"),
    path("v1/sync/digest", api_events.SyncDigestApi.as_view(), name="sync-digest"),
    path("v1/keys", api_access.KeyCollectionApi.as_view(), name="keys"),
    path("v1/keys/<uuid:key_id>", api_access.KeyDetailApi.as_view(), name="key-detail"),
    path("v1/whoami", api_access.WhoamiApi.as_view(), name="whoami"),
    path("v1/audit", api_access.AuditApi.as_view(), name="audit"),
    # Served by memoryproject.asgi before Django; this answers only under a WSGI server.
    path("v1/stream", api_errors.stream_needs_asgi_view, name="stream-needs-asgi"),
    path("healthz", api.healthz, name="healthz"),
    path("metrics", api.metrics_view, name="metrics"),
    path("readyz", api.readyz, name="readyz"),
]
