from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    path("", include("memories.urls")),
    path("", include("webhooks.urls")),
]

# Unknown paths answer in the API's JSON shape, not Django's HTML page.
handler404 = "memories.api_errors.not_found_view"
handler500 = "memories.api_errors.server_error_view"
