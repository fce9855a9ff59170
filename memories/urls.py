from django.urls import path

from memories import api

urlpatterns = [
    path("v1/users", api.UserCreateApi.as_view(), name="user-create"),
    path("create/user", api.UserCreateApi.as_view(), name="user-create-alias"),
    path("v1/users/<uuid:user_id>", api.UserDetailApi.as_view(), name="user-detail"),
    path("v1/memories", api.MemoryCollectionApi.as_view(), name="memories"),
    path("v1/memories/search", api.MemorySearchApi.as_view(), name="memory-search"),
    path("v1/memories/<uuid:memory_id>", api.MemoryDetailApi.as_view(), name="memory-detail"),
    path(
        "v1/memories/<uuid:memory_id>/history",
        api.MemoryHistoryApi.as_view(),
        name="memory-history",
    ),
    path("v1/requests/<uuid:request_id>", api.MemoryRequestStatusApi.as_view(), name="request"),
    path(
        "get_status/<uuid:request_id>", api.MemoryRequestStatusApi.as_view(), name="request-alias"
    ),
    path("healthz", api.healthz, name="healthz"),
    path("readyz", api.readyz, name="readyz"),
]
