"""The contracts every model provider honours.

Providers know nothing of Django models: they take plain strings and return plain values, so the
pipeline can be tested against any of them and a new endpoint is one small class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

MemoryEvent = Literal["ADD", "UPDATE", "DELETE", "NONE"]


class ProviderError(Exception):
    """A model call failed or answered something unusable; the job may be retried."""

    # Whether asking again later can help: a timeout, a rate limit, a 5xx or a model that
    # rambled might do better next time; an endpoint that refused the request will not.
    retryable: bool = True


class ProviderRejected(ProviderError):
    """The endpoint refused the request itself (a 4xx other than 408/409/429: a bad request,
    a wrong key, an unknown model): the same request will be refused again, so the job fails
    at once instead of spending its attempts."""

    retryable = False


@dataclass(frozen=True)
class ExistingMemory:
    """A stored memory as the decider sees it: a small integer id, never a UUID."""

    id: int
    text: str


@dataclass(frozen=True)
class Decision:
    """One operation the decider chose.

    ADD carries `text` and no id; UPDATE carries `memory_id` and the new `text`; DELETE and
    NONE carry `memory_id` (NONE may carry none when a fact is simply dropped).
    """

    event: MemoryEvent
    text: str | None = None
    memory_id: int | None = None


class LLMProvider(Protocol):
    def extract_facts(self, messages: list[dict[str, str]]) -> list[str]:
        """LLM call 1: the durable facts stated in a conversation, as short sentences."""
        ...

    def decide(self, facts: list[str], memories: list[ExistingMemory]) -> list[Decision]:
        """LLM call 2: what to do with each fact given the nearest stored memories."""
        ...


class Embedder(Protocol):
    dimensions: int

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order, each of length `dimensions`, computed in one call."""
        ...
