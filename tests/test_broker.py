"""The broker transport (memoryproject/broker.py): kombu's Redis transport, reusing its client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from django.conf import settings

from memoryproject.broker import Transport
from memoryproject.celery import app
from tests.helpers import submit_job


@dataclass
class Queue:
    name: str
    redis: redis.Redis

    def depth(self) -> int:
        return self.redis.llen(self.name)


@pytest.fixture
def queue(request) -> Iterator[Queue]:
    """An empty Redis list named after the test, as a queue to publish to; emptied after."""
    direct = redis.Redis.from_url(settings.REDIS_URL)
    name = f"test-broker-{request.node.name}"
    direct.delete(name)
    yield Queue(name, direct)
    direct.delete(name)


def test_tasks_are_published_through_one_reused_client(monkeypatch, queue) -> None:
    built = []
    original_init = redis.Redis.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original_init(self, *args, **kwargs)

    with app.producer_or_acquire() as producer:
        assert isinstance(producer.connection.transport, Transport)
        producer.publish({"n": -1}, routing_key=queue.name)  # warm: the channel's client is built
        monkeypatch.setattr(redis.Redis, "__init__", counting_init)
        for n in range(20):
            producer.publish({"n": n}, routing_key=queue.name)
        monkeypatch.undo()
    assert queue.depth() == 21
    assert built == []  # kombu alone would have built a client per message


def test_publishing_goes_on_after_redis_drops_the_connection(queue) -> None:
    with app.producer_or_acquire() as producer:
        producer.publish({"n": 1}, routing_key=queue.name)
        # Redis closes the publisher's connection, as on a restart or an idle timeout.
        with producer.channel.conn_or_acquire() as client:
            publisher_id = client.client_id()
        assert queue.redis.client_kill_filter(_id=publisher_id) == 1
        producer.publish({"n": 2}, routing_key=queue.name)
    assert queue.depth() == 2


def test_the_reused_client_follows_the_channel_to_its_new_pool(queue) -> None:
    # After a disconnect (or a fork) kombu replaces the channel's pool; the reused client must
    # move with it, not keep sending through the old pool.
    with app.producer_or_acquire() as producer:
        producer.publish({"n": 1}, routing_key=queue.name)
        channel = producer.channel
        old_pool = channel._commands_client.connection_pool
        channel._disconnect_pools()
        producer.publish({"n": 2}, routing_key=queue.name)
        assert channel._commands_client.connection_pool is channel.pool is not old_pool
    assert queue.depth() == 2


def test_a_job_sent_to_an_empty_redis_reaches_its_lane(end_user) -> None:
    # Tasks are sent without declaring their queue (memories/dispatch.py): on a Redis that has
    # never seen a worker, no binding exists, and the message must still land on the lane.
    from memories import dispatch

    direct = redis.Redis.from_url(settings.REDIS_URL)
    direct.flushdb()
    memory_request = submit_job(end_user, "I like tea.")
    direct.delete("default")  # whatever the commit hook sent already; send it once more here
    dispatch.request_send(
        request_id=str(memory_request.id),
        kind=memory_request.kind,
        priority=memory_request.priority,
    )
    assert direct.keys("_kombu.binding.*") == []
    (message,) = direct.lrange("default", 0, -1)
    assert str(memory_request.id) in message.decode()
    direct.delete("default")


def test_only_plain_redis_urls_get_the_reusing_transport() -> None:
    from memoryproject.broker import transport_for

    assert transport_for("redis://127.0.0.1:6379/0") == "memoryproject.broker:Transport"
    # TLS, Sentinel and socket URLs keep the transport kombu picks from their scheme.
    for url in ("rediss://h:6380/0", "sentinel://h:26379", "redis+socket:///tmp/redis.sock"):
        assert transport_for(url) is None
    assert transport_for(settings.REDIS_URL) == settings.CELERY_BROKER_TRANSPORT


@pytest.mark.parametrize(
    ("failure", "propagates"),
    [(KeyError("id"), False), (redis.exceptions.ConnectionError("gone"), True)],
    ids=["a-message-the-consumer-fails-on", "a-lost-connection"],
)
def test_a_consumer_failure_drops_the_message_but_a_lost_connection_reaches_the_worker(
    queue, failure, propagates
) -> None:
    import kombu

    def consumer_fails(body, message) -> None:
        raise failure

    with kombu.Connection(settings.CELERY_BROKER_URL, transport=Transport) as connection:
        kombu_queue = kombu.Queue(queue.name, routing_key=queue.name)
        with connection.Producer() as producer:
            producer.publish({"n": 1}, routing_key=queue.name, declare=[kombu_queue])
        with connection.Consumer(kombu_queue, callbacks=[consumer_fails]):
            if propagates:  # the worker must see it, to reconnect
                with pytest.raises(redis.exceptions.ConnectionError):
                    connection.drain_events(timeout=5)
            else:  # logged and acknowledged
                connection.drain_events(timeout=5)
    unacked = [entry for entry in queue.redis.hvals("unacked") if queue.name.encode() in entry]
    assert unacked == []
    # A dropped message is gone; one whose connection was lost is back on its queue.
    assert queue.depth() == (1 if propagates else 0)
