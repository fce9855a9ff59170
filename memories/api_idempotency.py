"""`Idempotency-Key` on the API's direct writes: `@idempotent_write` on a view method.

    class MemoryDetailApi(TenantApi):
        @idempotent_write
        def patch(self, request, memory_id): ...

With the header, the method runs inside one transaction that first takes the key
(memories.idempotency) and, before committing, stores the answer: so the write and its answer
commit together, a duplicate sent meanwhile waits and then gets that answer, and a write whose
answer was lost is never applied twice. The same key with the same method, path and body answers
the first status and body again (with `Idempotent-Replayed: true`); with another request it is
`422 idempotency_key_reused`.

An error answer (4xx, 5xx, raised or returned) is not stored: its transaction rolls back with the
key, so the same key may be sent again and is judged afresh (a 412 whose base was stale stays a
412; a 429 or 502 may succeed). The exception is an outcome the service recorded before raising
(`ServiceError.recorded`: a concurrent write kept as a conflict, 409): it commits with its key and
is replayed. Without the header, the method runs as before.

The transaction spans the whole method, embedding calls included (a correction, a batch): a
connection is held for that time, by the writes that send a key.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

from django.db import transaction
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder

from memories import idempotency
from memories.api_errors import exception_handler
from memories.auth import TenantPrincipal
from memories.errors import InvalidInput, ServiceError

# Headers of the first answer that its replay carries too.
_KEPT_HEADERS = ("ETag", "Location")

ViewMethod = TypeVar("ViewMethod", bound=Callable[..., Response])


def idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key` header (None without one); longer than 255: a 400."""
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > 255:
        raise InvalidInput(
            "Idempotency-Key is longer than 255 characters.", field="Idempotency-Key"
        )
    return key


def idempotent_write(view_method: ViewMethod) -> ViewMethod:
    """Make a write view's method honour `Idempotency-Key` (see the module's opening)."""

    @functools.wraps(view_method)
    def wrapper(view: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = idempotency_key(request)
        if key is None:
            return view_method(view, request, *args, **kwargs)
        tenant_id = cast(TenantPrincipal, request.user).tenant.id
        fingerprint = idempotency.request_fingerprint(
            method=request.method or "", path=request.path, body=request.data
        )
        with transaction.atomic():
            stored = idempotency.idempotent_write_begin(
                tenant_id=tenant_id, key=key, fingerprint=fingerprint
            )
            if stored is not None:
                headers = {**stored.headers, "Idempotent-Replayed": "true"}
                return Response(stored.body, status=stored.status, headers=headers)
            recorded = False
            try:
                response = view_method(view, request, *args, **kwargs)
            except ServiceError as exc:
                if not exc.recorded:
                    raise
                # A conflict kept: the write's outcome, committed with its key, replayed as is.
                answer = exception_handler(exc, {})
                assert answer is not None  # every ServiceError has its answer
                recorded, response = True, answer
            if response.status_code >= 400 and not recorded:
                transaction.set_rollback(True)  # not stored: the key stays free
                return response
            idempotency.idempotent_write_finish(
                tenant_id=tenant_id,
                key=key,
                status=response.status_code,
                # As the renderer will write it (UUIDs, dates as text), then stored as JSON.
                body=json.loads(json.dumps(response.data, cls=JSONEncoder)),
                headers={name: response[name] for name in _KEPT_HEADERS if name in response},
            )
        return response

    return cast(ViewMethod, wrapper)
