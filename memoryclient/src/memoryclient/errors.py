"""The SDK's errors: one class per kind of refusal, each carrying the HTTP status and the message.

The server answers every error as `{"error": code, "message": ..., "fields"?: {...}, ...details}`;
`error_for` turns such an answer into the matching class, details kept in `body`.
"""

from __future__ import annotations

from typing import Any


class MemoryClientError(Exception):
    """Base of every error the SDK raises. `status` is the HTTP status (0: no answer at all)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str = "",
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body: dict[str, Any] = body or {}
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}" if self.code else self.message


class Unauthorized(MemoryClientError):
    """401: no key, or a key that is unknown, revoked or expired."""


class Forbidden(MemoryClientError):
    """403: the key lacks a right; `missing_grant` names it (`user:<id>`, `role:admin`, ...)."""

    @property
    def missing_grant(self) -> str | None:
        value = self.body.get("missing_grant")
        return str(value) if value is not None else None


class NotFound(MemoryClientError):
    """404: no such user, memory, request or conflict in this tenant."""


class Conflict(MemoryClientError):
    """409: a live duplicate job (`body["request_id"]`), an existing external id
    (`body["user_id"]`), or a concurrent write to a `merge: "manual"` memory
    (`body["conflict"]`)."""


class Gone(MemoryClientError):
    """410: a sync cursor or event position too old; `snapshot` is where the live set is read."""

    @property
    def snapshot(self) -> str | None:
        value = self.body.get("snapshot")
        return str(value) if value is not None else None


class PreconditionFailed(MemoryClientError):
    """412: the write was based on an older version; `current_version` is the memory's now."""

    @property
    def current_version(self) -> int | None:
        value = self.body.get("current_version")
        return int(value) if value is not None else None

    @property
    def clock(self) -> dict[str, int]:
        return dict(self.body.get("clock") or {})


class InvalidInput(MemoryClientError):
    """400 or 422: `fields` maps each field to its problems (`{"user_id": ["..."]}`)."""

    @property
    def fields(self) -> dict[str, list[str]]:
        return dict(self.body.get("fields") or {})


class RateLimited(MemoryClientError):
    """429, once the client's retries (after `Retry-After`) ran out."""


class ServerError(MemoryClientError):
    """5xx (a 503 once the retries ran out)."""


class Unreachable(MemoryClientError):
    """No answer: the connection failed or timed out (status 0). A write may or may not have been
    applied; send it again with the same Idempotency-Key to be sure it is applied once."""


_BY_STATUS: dict[int, type[MemoryClientError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    412: PreconditionFailed,
    422: InvalidInput,
    429: RateLimited,
}


def error_for(status: int, body: Any, *, retry_after: float | None = None) -> MemoryClientError:
    """The error for an answer of `status` whose JSON body is `body` (anything, if not JSON)."""
    details: dict[str, Any] = body if isinstance(body, dict) else {}
    code = str(details.get("error") or "")
    message = str(details.get("message") or details.get("detail") or f"HTTP {status}")
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else MemoryClientError)
    return kind(message, status=status, code=code, body=details, retry_after=retry_after)
