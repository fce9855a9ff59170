"""memoryclient: the memory service's Python SDK (HTTP only; nothing of the server is imported).

from memoryclient import MemoryClient, LocalCache
client = MemoryClient("http://localhost:8000", api_key)
"""

from memoryclient.async_client import AsyncMemoryClient, AsyncSubscription
from memoryclient.cache import LocalCache, PendingWrite
from memoryclient.client import MemoryClient, Subscription
from memoryclient.errors import (
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    MemoryClientError,
    NotFound,
    PreconditionFailed,
    RateLimited,
    ServerError,
    Unauthorized,
    Unreachable,
)

__all__ = [
    "AsyncMemoryClient",
    "AsyncSubscription",
    "Conflict",
    "Forbidden",
    "Gone",
    "InvalidInput",
    "LocalCache",
    "MemoryClient",
    "MemoryClientError",
    "NotFound",
    "PendingWrite",
    "PreconditionFailed",
    "RateLimited",
    "ServerError",
    "Subscription",
    "Unauthorized",
    "Unreachable",
]
