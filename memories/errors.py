"""Domain errors: values a user can read. `memories.api_errors` maps each to one HTTP status."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a service raises on purpose."""

    code = "error"
    # True for an outcome the service committed before raising (a conflict kept): an answer to
    # keep with the write's Idempotency-Key, not an error that undoes the request.
    recorded = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(ServiceError):
    code = "not_found"


class Forbidden(ServiceError):
    """The key's role or grants do not allow the call; `missing_grant` names what would."""

    code = "forbidden"


class InvalidInput(ServiceError):
    """Input that passed the serializer but breaks a rule (`field` names the culprit)."""

    code = "invalid_request"


class DuplicateRequest(ServiceError):
    """The same job is already live; `request_id` and `status` name the original."""

    code = "duplicate_request"


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key was sent again with a different body."""

    code = "idempotency_key_reused"


class AlreadyExists(ServiceError):
    code = "already_exists"


class LimitReached(ServiceError):
    """The tenant has as many of these as it may have."""

    code = "limit_reached"


class VersionConflict(ServiceError):
    """`If-Match` named a version that is no longer current."""

    code = "version_conflict"


class ConflictRecorded(ServiceError):
    """A write concurrent with another, on a memory that merges by hand: kept as `conflict`,
    not applied."""

    code = "conflict"
    recorded = True


class Overloaded(ServiceError):
    """Too much work is waiting; `retry_after` seconds is a fair wait."""

    code = "overloaded"


class RateLimited(ServiceError):
    code = "rate_limited"


class Gone(ServiceError):
    """A position (cursor) the service can no longer answer from without a gap."""

    code = "cursor_expired"
