"""One place that turns errors into HTTP answers, all in the same JSON shape:

{"error": "<code>", "message": "<readable>", "fields": {"<field>": ["<problem>"]}, ...details}
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from memories import errors
from memories.providers import ProviderError

logger = logging.getLogger(__name__)
PROVIDER_RETRY_AFTER_SECONDS = 5

STATUS_BY_ERROR: dict[type[errors.ServiceError], int] = {
    errors.NotFound: status.HTTP_404_NOT_FOUND,
    errors.Forbidden: status.HTTP_403_FORBIDDEN,
    errors.InvalidInput: status.HTTP_400_BAD_REQUEST,
    errors.DuplicateRequest: status.HTTP_409_CONFLICT,
    errors.AlreadyExists: status.HTTP_409_CONFLICT,
    errors.LimitReached: status.HTTP_409_CONFLICT,
    errors.IdempotencyKeyReused: status.HTTP_422_UNPROCESSABLE_ENTITY,
    errors.VersionConflict: status.HTTP_412_PRECONDITION_FAILED,
    errors.ConflictRecorded: status.HTTP_409_CONFLICT,
    errors.Overloaded: status.HTTP_429_TOO_MANY_REQUESTS,
    errors.RateLimited: status.HTTP_429_TOO_MANY_REQUESTS,
    errors.Gone: status.HTTP_410_GONE,
}


class ErrorOutput(serializers.Serializer):
    """Every error's JSON (OpenAPI's `Error`): `error` a stable code, `message` for people,
    `fields` the invalid input by name; some errors add what the caller needs next."""

    error = serializers.CharField()
    message = serializers.CharField()
    fields = serializers.DictField(required=False)  # type: ignore[assignment]  # a field (DRF pops it)
    # 403: the role or grant that would allow the call.
    missing_grant = serializers.CharField(required=False)
    # 409 duplicate_request: the original request; 409 already_exists: the existing user.
    request_id = serializers.UUIDField(required=False)
    status = serializers.CharField(required=False)
    user_id = serializers.UUIDField(required=False, allow_null=True)
    # 412: the memory's version now (and its clock); 409 conflict: the conflict recorded.
    current_version = serializers.IntegerField(required=False)
    clock = serializers.DictField(child=serializers.IntegerField(), required=False)
    conflict = serializers.DictField(required=False)
    # 410: the query to rebuild from; 429: seconds to wait (also as Retry-After).
    snapshot = serializers.CharField(required=False)
    retry_after = serializers.IntegerField(required=False)


def _body(code: str, message: str, fields: dict[str, Any] | None = None, **extra: Any) -> dict:
    body: dict[str, Any] = {"error": code, "message": message}
    if fields:
        body["fields"] = fields
    body.update(extra)
    return body


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, errors.ServiceError):
        details = dict(exc.details)
        field = details.pop("field", None)
        headers = details.pop("headers", {})
        if "retry_after" in details:
            headers["Retry-After"] = str(details["retry_after"])
        fields: dict[str, Any] | None = (
            {field: [exc.message]} if field and isinstance(exc, errors.InvalidInput) else None
        )
        return Response(
            _body(exc.code, exc.message, fields, **details),
            status=STATUS_BY_ERROR[type(exc)],
            headers=headers,
        )
    if isinstance(exc, ProviderError):
        # The embedding model, called in the request (a correction, a batch), failed: nothing
        # was written, and the same call may succeed later. What failed (the provider's address,
        # its answer) goes to the log, not to the tenant.
        logger.error("model provider failed during %s: %s", context.get("view"), exc)
        # A refusal (a bad key, an unknown model) will be refused again: no Retry-After.
        retry = {"Retry-After": str(PROVIDER_RETRY_AFTER_SECONDS)} if exc.retryable else {}
        return Response(
            _body("provider_unavailable", "The model provider failed; nothing was changed."),
            status=status.HTTP_502_BAD_GATEWAY,
            headers=retry,
        )
    if isinstance(exc, RequestDataTooBig):
        return Response(
            _body(
                "invalid_request", "Request body too large.", {"body": ["Request body too large."]}
            ),
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return Response(
            _body("invalid_request", "Some fields are invalid.", fields),
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, exceptions.ParseError):
        return Response(
            _body("invalid_request", str(exc.detail), {"body": [str(exc.detail)]}),
            status=status.HTTP_400_BAD_REQUEST,
        )
    response = drf_exception_handler(exc, context)
    if response is not None:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else ""
        code = getattr(getattr(exc, "detail", None), "code", None) or "error"
        if isinstance(exc, Http404):
            code = "not_found"
        response.data = _body(str(code), str(detail))
    return response


def not_found_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(_body("not_found", "Not found."), status=404)


def server_error_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse(_body("server_error", "Internal error; it has been logged."), status=500)


def stream_needs_asgi_view(request: HttpRequest) -> JsonResponse:
    """`/v1/stream` reached Django: the process is a plain WSGI server (`runserver`, gunicorn's
    sync workers), which cannot hold thousands of open streams. The ASGI app answers it instead."""
    message = (
        "The event stream needs the ASGI server: run `make run` or "
        "`uvicorn memoryproject.asgi:application`, not a WSGI server such as runserver."
    )
    return JsonResponse(_body("not_implemented", message), status=501)
