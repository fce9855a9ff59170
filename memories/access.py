"""Who may do what: a key's role and grants, asked in one place by every entry point.

    access = Access.of(principal)
    access.user(user_id, write=True)     # the user's memories, jobs, sessions, channel
    access.topic("news", write=False)    # a topic's shared memories and channel
    access.shared(write=True)            # the tenant's shared memories (scope tenant)
    access.memory(memory, write=True)    # one of the three, by the memory's scope
    access.admin()                       # keys, webhooks, tenant-wide events, analytics, audit
    access.actor(agent_id=...)           # who a change is recorded as (key id and agent id)

Each check raises `Forbidden` (403, with `missing_grant`) or returns None. A user or memory of
another tenant stays 404: the selectors scope every read by tenant first, and a user that
`user()` itself reads (to learn who created it) and does not find in the tenant is NotFound.

Roles: `admin` may do everything in its tenant. `agent` may create users; read and write the
users and topics it is granted (`user:<uuid>`, `topic:<name>`, `*` for every user and topic) and
the users it created itself; read the tenant's shared memories, and write them with
`shared:write`. `read-only` has an agent's reads, and no writes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from memories.errors import Forbidden, InvalidInput, NotFound
from memories.models import ApiKey, EndUser

ADMIN, AGENT, READ_ONLY = ApiKey.Role.ADMIN.value, ApiKey.Role.AGENT.value, ApiKey.Role.READ_ONLY
ROLES = tuple(ApiKey.Role.values)
EVERYTHING = "*"
SHARED_WRITE = "shared:write"

# A topic name: printable, no commas (channel lists are comma-separated), 1-200 characters.
_TOPIC_MAX = 200


def grants_validate(grants: Any) -> list[str]:
    """The grants, checked and in canonical form (user ids as lowercase UUIDs, no repeats);
    InvalidInput naming `grants` otherwise."""
    if not isinstance(grants, list) or len(grants) > 1000:
        raise InvalidInput("grants must be a list of at most 1000 strings.", field="grants")
    canonical: list[str] = []
    for grant in grants:
        value = _grant_canonical(grant)
        if value is None:
            raise InvalidInput(
                f"Unknown grant {grant!r}: use user:<uuid>, topic:<name>, shared:write or *.",
                field="grants",
            )
        if value not in canonical:
            canonical.append(value)
    return canonical


def _grant_canonical(grant: Any) -> str | None:
    if not isinstance(grant, str):
        return None
    if grant in (EVERYTHING, SHARED_WRITE):
        return grant
    kind, _, name = grant.partition(":")
    if kind == "user":
        try:
            return f"user:{uuid.UUID(name)}"
        except ValueError:
            return None
    if kind == "topic" and 0 < len(name) <= _TOPIC_MAX and name.isprintable() and "," not in name:
        return grant
    return None


def _canonical_id(user_id: Any) -> str:
    try:
        return str(uuid.UUID(str(user_id)))
    except ValueError:
        return str(user_id)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Actor:
    """Who made a change: the key (its id) and the agent that used it."""

    key_id: str
    agent_id: str


# `Access.user` reads who created the user unless the caller, holding the user, says.
_UNREAD: Any = object()


@dataclass(frozen=True)
class Access:
    """The calling key's rights in its tenant."""

    key_id: str
    key_name: str
    tenant_id: str = ""
    role: str = ADMIN
    grants: frozenset[str] = frozenset()

    @classmethod
    def of(cls, principal: Any) -> Access:
        api_key = principal.api_key
        return cls(
            key_id=str(api_key.pk),
            key_name=api_key.name or "",
            tenant_id=str(api_key.tenant_id),
            role=api_key.role or ADMIN,
            grants=frozenset(api_key.grants or ()),
        )

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def user(self, user_id: Any, *, write: bool = False, created_by_key_id: Any = _UNREAD) -> None:
        """The user's memories, jobs, sessions and channel. `created_by_key_id`: the user's
        creator when the caller has read the user (saves a read); a user this key created is
        granted to it."""
        if self.is_admin:
            return
        self._writes(write)
        user_id = _canonical_id(user_id)
        if EVERYTHING in self.grants or f"user:{user_id}" in self.grants:
            return
        if created_by_key_id is _UNREAD:
            found = (
                list(
                    EndUser.objects.filter(
                        pk=user_id, tenant_id=self.tenant_id, erasing_since__isnull=True
                    ).values_list("created_by_key_id", flat=True)[:1]
                )
                if _is_uuid(user_id)
                else []
            )
            if not found:  # not the tenant's: the same 404 as the selectors'
                raise NotFound("User not found.", field="user_id")
            created_by_key_id = found[0]
        if created_by_key_id is not None and str(created_by_key_id) == self.key_id:
            return
        raise Forbidden(f"This key is not granted user {user_id}.", missing_grant=f"user:{user_id}")

    def users(self, user_ids: Any, *, write: bool = False) -> None:
        """`user()` for many users (a batch's) in one read; ids not of the tenant are left to
        the caller (a batch answers them per item)."""
        if self.is_admin:
            return
        self._writes(write)
        if EVERYTHING in self.grants:
            return
        wanted = {_canonical_id(u) for u in user_ids if _is_uuid(str(u))}
        wanted = {u for u in wanted if f"user:{u}" not in self.grants}
        if not wanted:
            return
        found = EndUser.objects.filter(pk__in=wanted, tenant_id=self.tenant_id).values_list(
            "id", "created_by_key_id"
        )
        for user_id, created_by_key_id in sorted(found, key=lambda row: str(row[0])):
            self.user(user_id, write=write, created_by_key_id=created_by_key_id)

    def user_create(self) -> None:
        """New users: every role but read-only (an agent then uses the users it creates)."""
        self._writes(True)

    def topic(self, name: str, *, write: bool = False) -> None:
        if self.is_admin:
            return
        self._writes(write)
        if EVERYTHING in self.grants or f"topic:{name}" in self.grants:
            return
        raise Forbidden(f"This key is not granted topic {name!r}.", missing_grant=f"topic:{name}")

    def shared(self, *, write: bool = False) -> None:
        """The tenant's shared memories: every role reads them; writing takes `shared:write`."""
        if self.is_admin or not write:
            return
        self._writes(write)
        if SHARED_WRITE not in self.grants:
            raise Forbidden(
                "This key may not write the tenant's shared memories.", missing_grant=SHARED_WRITE
            )

    def memory(self, memory: Any, *, write: bool = False) -> None:
        """A memory (anything with `scope`, `user_id` and `topic`), by its scope: a user's is
        its owner's, a topic's its topic's, a tenant's the shared memories'."""
        if self.is_admin:
            return
        if memory.scope == "tenant":
            self.shared(write=write)
        elif memory.scope == "topic":
            self.topic(memory.topic, write=write)
        else:
            self.user(memory.user_id, write=write)

    def admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("Only an admin key may do this.", missing_grant="role:admin")

    def actor(self, *, agent_id: str | None = None) -> Actor:
        """The body's `agent_id`, else the X-Agent-Id header's (the caller passes whichever it
        has), else the key's name, else the key itself (`key:<first 8 of its id>`): a clock
        needs a name for every writer."""
        name = agent_id or self.key_name or f"key:{self.key_id[:8]}"
        return Actor(key_id=self.key_id, agent_id=name[:200])

    def _writes(self, write: bool) -> None:
        if write and self.role == READ_ONLY:
            raise Forbidden("A read-only key may not write.", missing_grant="role:agent")
