from django.contrib import admin
from django.contrib.staticfiles.views import serve as static_serve
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

# The contract is public (it holds no secrets): no key asked, no rate limit (not a TenantApi).
_public = {"authentication_classes": [], "permission_classes": [AllowAny]}

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/schema/", SpectacularAPIView.as_view(**_public), name="openapi-schema"),
    path(
        "v1/docs/",
        SpectacularSwaggerView.as_view(url_name="openapi-schema", **_public),
        name="openapi-docs",
    ),
    # Swagger UI's files, from drf-spectacular-sidecar (no CDN, no collectstatic step).
    re_path(
        r"^static/(?P<path>drf_spectacular_sidecar/.*)$",
        static_serve,
        {"insecure": True},
        name="openapi-assets",
    ),
    path("dashboard/", include("dashboard.urls")),
    path("", include("memories.urls")),
    path("", include("webhooks.urls")),
]

# Unknown paths answer in the API's JSON shape, not Django's HTML page.
handler404 = "memories.api_errors.not_found_view"
handler500 = "memories.api_errors.server_error_view"
