"""The broker transport (memoryproject/broker.py): kombu's Redis transport, reusing its client."""

from __future__ import annotations

import redis
from django.conf import settings

from memoryproject.broker import Transport
from memoryproject.celery import app


def _queued(client: redis.Redis, queue: str) -> int:
    return client.llen(queue)


def test_tasks_are_published_through_one_reused_client(monkeypatch) -> None:
    queue = "test-broker-reuse"
    direct = redis.Redis.from_url(settings.REDIS_URL)
    direct.delete(queue)
    built = []
    original_init = redis.Redis.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original_init(self, *args, **kwargs)

    with app.producer_or_acquire() as producer:
        assert isinstance(producer.connection.transport, Transport)
        producer.publish({"n": -1}, routing_key=queue)  # warm: the channel's client is built
        monkeypatch.setattr(redis.Redis, "__init__", counting_init)
        for n in range(20):
            producer.publish({"n": n}, routing_key=queue)
        monkeypatch.undo()
    assert _queued(direct, queue) == 21
    assert built == []  # kombu alone would have built a client per message
    direct.delete(queue)


def test_publishing_goes_on_after_redis_drops_the_connection() -> None:
    queue = "test-broker-reconnect"
    direct = redis.Redis.from_url(settings.REDIS_URL)
    direct.delete(queue)
    with app.producer_or_acquire() as producer:
        producer.publish({"n": 1}, routing_key=queue)
        # Redis closes the publisher's connection, as on a restart or an idle timeout.
        with producer.channel.conn_or_acquire() as client:
            publisher_id = client.client_id()
        assert direct.client_kill_filter(_id=publisher_id) == 1
        producer.publish({"n": 2}, routing_key=queue)
    assert _queued(direct, queue) == 2
    direct.delete(queue)
