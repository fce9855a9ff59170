"""Every change is an event: built here, recorded in the outbox, published to Redis.

    build_event(...)      -> the event dict (schema 1)
    record(event)         -> written in the current transaction, published after commit
    record_read(event)    -> a read's event (a search), published at once, no outbox row
    channels_for_memory() -> the client-facing channel names a memory change goes to

Redis layout (see `memories.events.stream`): the stream `memory:events` holds every event (entry
fields `event` = the JSON, plus `type`, `tenant_id`, `user_id`, `session_id` for cheap filtering);
each event is also PUBLISHed on its channels as {"id": <stream id>, "event": ...}.
"""

from memories.events.publisher import (
    publish_outbox,
    record,
    record_many,
    record_read,
)
from memories.events.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    MemoryFields,
    build_event,
    channels_for_memory,
    memory_event,
    system_channel,
    tenant_channel,
    topic_channel,
    user_channel,
)

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "MemoryFields",
    "build_event",
    "channels_for_memory",
    "memory_event",
    "publish_outbox",
    "record",
    "record_many",
    "record_read",
    "system_channel",
    "tenant_channel",
    "topic_channel",
    "user_channel",
]
