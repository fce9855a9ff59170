"""/dashboard/: the staff dashboard. Its event stream, /dashboard/stream, is served before Django
(memoryproject.asgi -> dashboard.stream)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard import views

app_name = "dashboard"

urlpatterns = [
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="dashboard/login.html", next_page="dashboard:index"
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("", views.index, name="index"),
    path("memories/<uuid:memory_id>/", views.memory_detail, name="memory"),
    path("requests/<uuid:request_id>/retry", views.request_retry, name="retry"),
    path("series", views.series, name="series"),
    path("assets/<path:path>", views.asset, name="asset"),
]
