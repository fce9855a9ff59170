"""The memory pipeline: extract facts, embed them in one batch, fetch the nearest memories, decide.

Model calls happen here, outside any transaction (they take seconds); the decided changes are then
applied by `services.memory_request_complete` in one short transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from django.conf import settings

from memories import metrics, selectors, services
from memories.jobs import request_run
from memories.models import MemoryRequest
from memories.providers import (
    Embedder,
    ExistingMemory,
    LLMProvider,
    ProviderConfig,
    build_embedder,
    build_llm,
)
from memories.providers.batching import BatchingEmbedder

logger = logging.getLogger(__name__)


def provider_config() -> ProviderConfig:
    return ProviderConfig(
        llm_provider=settings.LLM_PROVIDER,
        embedding_provider=settings.EMBEDDING_PROVIDER,
        openai_api_key=settings.OPENAI_API_KEY,
        openai_base_url=settings.OPENAI_BASE_URL,
        llm_model=settings.LLM_MODEL,
        embedding_model=settings.EMBEDDING_MODEL,
        embedding_dimensions=settings.EMBEDDING_DIMENSIONS,
        embedding_send_dimensions=settings.EMBEDDING_SEND_DIMENSIONS,
        request_timeout=settings.LLM_REQUEST_TIMEOUT_SECONDS,
        client_max_retries=settings.LLM_CLIENT_MAX_RETRIES,
    )


T = TypeVar("T")


class _BuiltOnce(Generic[T]):
    """`functools.cache` for a builder without arguments, but built once only: the threads of a
    `threads` worker that ask at the same moment get the same provider, so they share its
    connections and its batching window (with `cache`, each first caller built its own)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._built: list[T] = []

    def __call__(self) -> T:
        if not self._built:
            with self._lock:
                if not self._built:
                    self._built.append(self._build())
        return self._built[0]

    def cache_clear(self) -> None:
        with self._lock:
            self._built.clear()


@_BuiltOnce
def get_llm() -> LLMProvider:
    return build_llm(provider_config())


@_BuiltOnce
def get_embedder() -> Embedder:
    embedder = build_embedder(provider_config())
    if settings.EMBEDDING_BATCH_WINDOW_MS > 0:
        # Jobs running side by side in one worker (thread pool) share embedding calls.
        embedder = BatchingEmbedder(
            embedder, window_seconds=settings.EMBEDDING_BATCH_WINDOW_MS / 1000
        )
    return embedder


def plan_changes(
    *, memory_request: MemoryRequest, llm: LLMProvider, embedder: Embedder
) -> list[services.PlannedChange]:
    """Decide what the job changes, without writing anything."""
    payload = memory_request.payload
    messages: list[dict[str, Any]] = payload["messages"]
    if not payload.get("infer", True):
        texts = [m["content"] for m in messages if m["role"] != "system"]
        return services.memories_create_direct(
            memory_request=memory_request, texts=texts, embedder=embedder
        )

    with metrics.timed("llm"):
        facts = llm.extract_facts(messages)
    if not facts:
        return []
    with metrics.timed("embedding"):
        fact_vectors = embedder.embed(facts)
    with metrics.timed("database"):
        neighbours = selectors.memory_nearest_for_many(
            user_id=memory_request.user_id,
            vectors=fact_vectors,
            per_vector=settings.MEMORY_NEIGHBOURS_PER_FACT,
        )
    # The LLM sees memories as 1..n: it copies short integers reliably, long UUIDs it invents.
    id_by_number = {number: memory_id for number, (memory_id, _) in enumerate(neighbours, start=1)}
    shown = [ExistingMemory(id=n, text=text) for n, (_, text) in enumerate(neighbours, start=1)]
    with metrics.timed("llm"):
        decisions = llm.decide(facts, shown)

    vector_by_text = dict(zip(facts, fact_vectors, strict=True))
    needs_embedding = sorted(
        {d.text for d in decisions if d.event in ("ADD", "UPDATE") and d.text}
        - vector_by_text.keys()
    )
    if needs_embedding:  # texts the decider wrote anew
        with metrics.timed("embedding"):
            vectors = embedder.embed(needs_embedding)
        vector_by_text.update(zip(needs_embedding, vectors, strict=True))

    changes: list[services.PlannedChange] = []
    targeted: set[str] = set()
    for decision in decisions:
        if decision.event == "NONE":
            continue
        if decision.event == "ADD":
            if decision.text:
                changes.append(
                    services.PlannedChange(
                        "ADD", None, decision.text, vector_by_text[decision.text]
                    )
                )
            continue
        memory_id = id_by_number.get(decision.memory_id) if decision.memory_id else None
        if memory_id is None:
            logger.warning(
                "request %s: the model named memory %r, which it was not shown; ignored",
                memory_request.id,
                decision.memory_id,
            )
            continue
        if memory_id in targeted:
            logger.warning(
                "request %s: memory %s targeted twice; second ignored", memory_request.id, memory_id
            )
            continue
        targeted.add(memory_id)
        if decision.event == "UPDATE" and decision.text:
            changes.append(
                services.PlannedChange(
                    "UPDATE", memory_id, decision.text, vector_by_text[decision.text]
                )
            )
        elif decision.event == "DELETE":
            changes.append(services.PlannedChange("DELETE", memory_id, None, None))
    return changes


def memory_job_work(claim: services.Claim, memory_request: MemoryRequest) -> None:
    """The work of a memory job, for `jobs.request_run`: plan with the models, then commit."""
    changes = plan_changes(memory_request=memory_request, llm=get_llm(), embedder=get_embedder())
    with metrics.timed("database"):
        services.memory_request_complete(claim=claim, changes=changes)


def memory_request_run(*, request_id: str) -> str:
    """Run one memory job end to end (see `jobs.request_run` for the outcomes and guarantees)."""
    return request_run(request_id=request_id, work=memory_job_work)
