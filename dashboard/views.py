"""The staff dashboard's pages: server-rendered, behind Django's session login, staff only.

Views only read the query, call memories' selectors and services, and render; the live parts
are the event feed (`dashboard.stream`, served before Django) and the charts, which poll
`series` (memories.timeseries). Every tenant is visible to staff: tenancy here is a choice in a
menu, not a boundary.
"""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from memories import backpressure, ledger, queue_load, selectors, timeseries
from memories.dispatch import Queue
from memories.errors import DuplicateRequest, NotFound, ServiceError
from memories.events.replay import events_latest
from memories.events.schema import EVENT_TYPES
from memories.events.stream import redis_client
from memories.filters import CHOICE_FIELDS, memory_filters_parse
from memories.models import EndUser, Memory, MemoryRequest, Tenant
from memories.providers.wiring import get_embedder
from memories.search import MODES, memory_search

View = Callable[..., HttpResponseBase]
LIST_LIMIT = 50
_ASSETS = Path(__file__).resolve().parent / "static" / "dashboard"


def staff_required(view: View) -> View:
    """Anonymous: to the login page (and back after). Signed in but not staff: 403."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("dashboard:login"))
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The dashboard is for staff.")
        return view(request, *args, **kwargs)

    return wrapped


def _tenant(request: HttpRequest) -> Tenant | None:
    tenant_id = request.GET.get("tenant") or request.POST.get("tenant")
    if not tenant_id:
        return None
    try:
        return selectors.tenant_get(tenant_id=tenant_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _end_user(request: HttpRequest, tenant: Tenant | None) -> EndUser | None:
    user_id = request.GET.get("user")
    if tenant is None or not user_id:
        return None
    try:
        return selectors.end_user_get(tenant=tenant, user_id=user_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _memories(request: HttpRequest, user: EndUser) -> tuple[list[dict[str, Any]], str]:
    """The user's memories (their own and the tenant's shared ones): a search when there is a
    query, else the newest. Returns rows to show and an error to show (bad input, overload)."""
    raw_filters = {name: request.GET.get(name, "") for name in CHOICE_FIELDS}
    query = request.GET.get("q", "").strip()
    try:
        filters = memory_filters_parse(raw_filters, prefix="")
        if not query:
            listed = selectors.memory_list(
                user=user, filters=filters, cursor=None, limit=LIST_LIMIT, include_shared=True
            )
            return [{"memory": memory} for memory in listed], ""
        with backpressure.embedding_slot():
            found = memory_search(
                user=user,
                query=query,
                limit=LIST_LIMIT,
                filters=filters,
                threshold=None,
                embedder=get_embedder(),
                mode=request.GET.get("mode") or "hybrid",
                include_shared=True,
            )
    except ServiceError as exc:
        return [], exc.message
    return [{"memory": f.memory, "score": f.score, "why": f.why} for f in found], ""


@require_GET
@staff_required
def index(request: HttpRequest) -> HttpResponse:
    tenant = _tenant(request)
    user = _end_user(request, tenant)
    context: dict[str, Any] = {
        "tenants": selectors.tenant_list(),
        "tenant": tenant,
        "end_user": user,
        "modes": MODES,
        "types": Memory.Type.values,
        "scopes": Memory.Scope.values,
        "lanes": [lane.value for lane in Queue],
        "event_types": EVENT_TYPES,
        "q": request.GET.get("q", ""),
        "mode": request.GET.get("mode", "hybrid"),
        "type": request.GET.get("type", ""),
        "scope": request.GET.get("scope", ""),
    }
    if tenant is not None:
        events = events_latest(tenant_id=str(tenant.id), user_id=str(user.id) if user else None)
        # The feed goes on after the newest event shown, so none falls between page and stream.
        stream_query = {"tenant": str(tenant.id)}
        if user is not None:
            stream_query["user"] = str(user.id)
        if events:
            stream_query["last_event_id"] = events[-1]["id"]
        counts = selectors.memory_request_counts(tenant=tenant)
        context.update(
            users=selectors.end_user_list(tenant=tenant),
            queue=[
                (status, [counts[status][lane] for lane in context["lanes"]]) for status in counts
            ],
            lane_depths=queue_load.lane_depths(),
            dead_letters=selectors.memory_request_list(
                tenant=tenant,
                status=MemoryRequest.Status.FAILURE,
                user_id=user.id if user else None,
                before=None,
                limit=LIST_LIMIT,
            ),
            conflicts=selectors.conflict_list(
                tenant=tenant, status="open", memory_id=None, before=None, limit=LIST_LIMIT
            ),
            events=events,
            stream_query=urlencode(stream_query),
        )
    if user is not None:
        context["memories"], context["search_error"] = _memories(request, user)
    return render(request, "dashboard/index.html", context)


@require_GET
@staff_required
def memory_detail(request: HttpRequest, memory_id: str) -> HttpResponse:
    tenant = _tenant(request)
    if tenant is None:
        raise Http404("Pick a tenant.")
    try:
        memory: Memory | None = selectors.memory_get(tenant=tenant, memory_id=memory_id)
    except NotFound:
        memory = None  # forgotten: its history (without content) is still there
    try:
        history = selectors.memory_history(tenant=tenant, memory_id=memory_id, limit=500)
    except NotFound as exc:
        raise Http404(exc.message) from exc
    return render(
        request,
        "dashboard/memory.html",
        {"tenant": tenant, "memory": memory, "memory_id": memory_id, "history": history},
    )


@require_POST
@staff_required
def request_retry(request: HttpRequest, request_id: str) -> HttpResponse:
    """The admin's retry (ledger.memory_request_retry) from the dead-letter list."""
    tenant = _tenant(request)
    if tenant is None:
        raise Http404("Pick a tenant.")
    try:
        failed = selectors.memory_request_get(tenant=tenant, request_id=request_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc
    try:
        retried = ledger.memory_request_retry(memory_request=failed)
    except DuplicateRequest as exc:
        messages.error(request, f"{request_id}: {exc.message}")
    else:
        if retried.status == MemoryRequest.Status.PENDING:
            messages.success(request, f"Request {request_id} sent again.")
        else:
            messages.info(request, f"Request {request_id} is {retried.status}: not retried.")
    back = {"tenant": str(tenant.id)}
    if request.POST.get("user"):
        back["user"] = request.POST["user"]
    return redirect(f"{reverse('dashboard:index')}?{urlencode(back)}#queue")


@require_GET
@staff_required
def series(request: HttpRequest) -> JsonResponse:
    """The charts' data: the last 15 minutes per second (memories.timeseries)."""
    tenant = _tenant(request)
    queue_load.lane_depths()  # a fresh sample of the lanes for this second, while someone looks
    data = timeseries.series(redis_client(), tenant_id=str(tenant.id) if tenant else None)
    return JsonResponse(data)


@require_GET
@staff_required
def asset(request: HttpRequest, path: str) -> FileResponse:
    """The dashboard's own static files (its script, the vendored chart library), served here
    so `make run` needs no static file server; `collectstatic` finds the same files."""
    target = (_ASSETS / path).resolve()
    if not target.is_relative_to(_ASSETS) or not target.is_file():
        raise Http404("No such file.")
    content_type, _ = mimetypes.guess_type(target.name)
    response = FileResponse(target.open("rb"), content_type=content_type or "text/plain")
    response["Cache-Control"] = "private, max-age=3600"
    return response
