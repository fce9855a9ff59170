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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)


# What the consumer must see to reconnect: the transport's connection errors, less KeyError, which
# kombu counts among them and a task message missing a field raises too.
_LOST_CONNECTION = tuple(
    error for error in kombu_redis.Transport.connection_errors if error is not KeyError
)


class Channel(kombu_redis.Channel):
    _commands_client: Any = None

    # Poison on the broker must not stop a worker. An exception out of a delivery reaches
    # Celery's consumer loop, which stops the whole worker as an unrecoverable error; where a
    # message cannot be read or handled, it is dropped instead, with a log line, and never loops.

    def _brpop_read(self, **options: Any) -> bool:
        # An entry that is not kombu's JSON envelope (written to the list by something else)
        # fails to parse before it is a message: it is already off the list, nothing to ack.
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError) as exc:
            logger.error("dropped a broker entry that is not a message (%r)", exc)
            return True

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Callable[[Any], Any], consumer_tag: str, **kw: Any
    ) -> Any:
        def handled(message: Any) -> Any:
            # A message is in the unacked index by now: one its consumer failed on (a task message
            # without its id, say) is acknowledged here, or it would hold its prefetch slot and
            # come back after the visibility timeout to fail again.
            try:
                return callback(message)
            except _LOST_CONNECTION:
                raise  # the consumer reconnects; the message is restored
            except Exception:
                logger.exception("dropped a message its consumer failed on: %r", message.headers)
                if not no_ack and not message.acknowledged:  # it may have acked, then failed
                    message.reject(requeue=False)
                return None

        return super().basic_consume(queue, no_ack, handled, consumer_tag, **kw)

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
