"""Who may do what: a key's role and grants, asked in one place by every entry point.

    access = Access.of(principal)
    access.user(user_id, write=True)     # the user's memories, jobs, sessions, channel
    access.topic("news", write=False)    # a topic's shared memories and channel
    access.shared(write=True)            # the tenant's shared memories (scope tenant)
    access.admin()                       # keys, webhooks, tenant-wide events, analytics, audit
    access.actor(agent_id=...)           # who a change is recorded as (key id and agent id)

Each check raises `Forbidden` (403, with `missing_grant`) or returns None. A user or memory of
another tenant is never asked about here: the selectors scope every read by tenant first, so
those stay 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Actor:
    """Who made a change: the key (its id) and the agent that used it."""

    key_id: str
    agent_id: str


@dataclass(frozen=True)
class Access:
    """The calling key's rights. Every key is an admin of its tenant until roles land."""

    key_id: str
    key_name: str

    @classmethod
    def of(cls, principal: Any) -> Access:
        api_key = principal.api_key
        return cls(key_id=str(api_key.pk), key_name=api_key.name or "")

    def user(self, user_id: Any, *, write: bool = False) -> None:
        return None

    def topic(self, name: str, *, write: bool = False) -> None:
        return None

    def shared(self, *, write: bool = False) -> None:
        return None

    def admin(self) -> None:
        return None

    def actor(self, *, agent_id: str | None = None) -> Actor:
        """The body's `agent_id`, else the X-Agent-Id header's (the caller passes whichever it
        has), else the key's name."""
        return Actor(key_id=self.key_id, agent_id=(agent_id or self.key_name or "")[:200])
