"""Celery's Redis transport (kombu), with one Redis client per channel for its commands.

kombu builds a new redis-py client for every command it sends outside its polling connection:
each task published, and each delivery and acknowledgement recorded in the unacked index. A
redis-py client copies its ~170 response callbacks when it is built, which cost more CPU than
sending the command (about a tenth of a millisecond here, three times per job). A client is a
thin handle over the channel's connection pool and safe to share between threads, so one per
channel does the same work.

Selected in settings (CELERY_BROKER_TRANSPORT, see `transport_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):
    _commands_client: Any = None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu parses what BRPOP popped as its JSON envelope; an entry that is not one (written
        # to the list by something other than kombu) raises out of the consumer, and Celery stops
        # the whole worker as an unrecoverable error. The entry is already off the list, so it is
        # dropped here, with a log line, and the worker goes on: a poison message never loops.
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError) as exc:
            logger.error("dropped a broker entry that is not a message (%r)", exc)
            return True

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        # Built again when the channel's pool was replaced (after a disconnect).
        if self._commands_client is None or self._commands_client.connection_pool is not pool:
            self._commands_client = self._create_client()
        yield self._commands_client


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport for plain `redis://` URLs; None (kombu picks by the URL's scheme) for the
    others: rediss://, sentinel://, redis+socket:// keep kombu's own handling."""
    return "memoryproject.broker:Transport" if broker_url.startswith("redis://") else None
