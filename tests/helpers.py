"""Small helpers the test files share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from memories import ledger, memory_writes
from memories.models import EndUser, Memory, MemoryRequest
from memories.providers.wiring import get_embedder


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Poll until `condition()` holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None if it is not there)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def model_env(fake: Any) -> dict[str, str]:
    """Environment for a worker process whose LLM and embedder are the fake OpenAI server."""
    return {
        "LLM_PROVIDER": "openai",
        "EMBEDDING_PROVIDER": "openai",
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": fake.base_url,
        "LLM_CLIENT_MAX_RETRIES": "0",
    }


def store_memories(user: EndUser, *texts: str, **fields: Any) -> list[Memory]:
    """Memories written straight to the table (no job), embedded like the service does."""
    vectors = get_embedder().embed(list(texts))
    return [
        Memory.objects.create(
            tenant=user.tenant,
            user=user,
            content=text,
            embedding=vector,
            content_hash=memory_writes.content_hash(text),
            **fields,
        )
        for text, vector in zip(texts, vectors, strict=True)
    ]


def submit_job(user: EndUser, *texts: str, infer: bool = True, **fields: Any) -> MemoryRequest:
    """A memory job of these user messages, recorded through the service (as the API does);
    `fields` override the payload's metadata, agent_id, session_id."""
    payload = {
        "messages": [{"role": "user", "content": text} for text in texts],
        "metadata": {},
        "agent_id": "",
        "session_id": "",
        "infer": infer,
        **fields,
    }
    return ledger.memory_request_submit(tenant_id=user.tenant_id, user_id=user.id, payload=payload)
