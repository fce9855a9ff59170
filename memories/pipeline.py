"""The memory pipeline: extract facts, embed them in one batch, fetch the nearest memories, decide.

Model calls happen here, outside any transaction (they take seconds); the decided changes are then
applied by `services.memory_request_complete` in one short transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from django.conf import settings
from django.db import connection

from memories import selectors, services
from memories.models import MemoryRequest
from memories.providers import (
    Embedder,
    ExistingMemory,
    LLMProvider,
    ProviderConfig,
    build_embedder,
    build_llm,
)

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


@cache
def get_llm() -> LLMProvider:
    return build_llm(provider_config())


@cache
def get_embedder() -> Embedder:
    return build_embedder(provider_config())


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

    facts = llm.extract_facts(messages)
    if not facts:
        return []
    fact_vectors = embedder.embed(facts)
    neighbours = selectors.memory_nearest_for_many(
        user_id=memory_request.user_id,
        vectors=fact_vectors,
        per_vector=settings.MEMORY_NEIGHBOURS_PER_FACT,
    )
    # The LLM sees memories as 1..n: it copies short integers reliably, long UUIDs it invents.
    id_by_number = {number: memory_id for number, (memory_id, _) in enumerate(neighbours, start=1)}
    shown = [ExistingMemory(id=n, text=text) for n, (_, text) in enumerate(neighbours, start=1)]
    decisions = llm.decide(facts, shown)

    vector_by_text = dict(zip(facts, fact_vectors, strict=True))
    needs_embedding = sorted(
        {d.text for d in decisions if d.event in ("ADD", "UPDATE") and d.text}
        - vector_by_text.keys()
    )
    if needs_embedding:
        vector_by_text.update(zip(needs_embedding, embedder.embed(needs_embedding), strict=True))

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


@contextmanager
def lease_kept(claim: services.Claim) -> Iterator[threading.Event]:
    """Renew the claim's lease in the background while the job runs.

    Yields an Event that is set if the lease was lost (taken over by another worker), so the job
    can stop early; the final commit is fenced by the claim token either way.
    """
    lost = threading.Event()
    stop = threading.Event()
    interval = max(settings.MEMORY_JOB_LEASE_SECONDS / 3, 0.2)

    def renew() -> None:
        try:
            while not stop.wait(interval):
                if not services.memory_request_renew_lease(claim=claim):
                    lost.set()
                    return
        except Exception:  # a renewal that fails only shortens the lease; the job goes on
            logger.exception("lease renewal for %s failed", claim.request_id)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=renew, name=f"lease-{claim.request_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def memory_request_run(*, request_id: str) -> str:
    """Run one memory job end to end. Returns what happened: `done`, `skipped`, `retry` or `failed`.

    Safe to call any number of times for the same request: only a claim holder commits, and a
    finished request is never claimed again.
    """
    claim = services.memory_request_claim(request_id=request_id)
    if claim is None:
        return "skipped"
    try:
        with lease_kept(claim):
            memory_request = MemoryRequest.objects.get(pk=claim.request_id)
            changes = plan_changes(
                memory_request=memory_request, llm=get_llm(), embedder=get_embedder()
            )
            services.memory_request_complete(claim=claim, changes=changes)
    except services.LeaseLost:
        logger.warning("request %s: lease taken over; this attempt's work discarded", request_id)
        return "skipped"
    except Exception as exc:  # every failure is an attempt: bounded by MEMORY_JOB_MAX_ATTEMPTS
        logger.exception("request %s attempt %s failed", request_id, claim.token)
        # A killed database connection must not poison the next statement of this worker
        # (never close one that an enclosing transaction still holds, though).
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()
        error = f"{type(exc).__name__}: {exc}"
        will_retry = services.memory_request_record_error(claim=claim, error=error)
        return "retry" if will_retry else "failed"
    return "done"
