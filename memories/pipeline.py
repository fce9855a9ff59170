"""The memory pipeline: extract facts, embed them in one batch, fetch the nearest memories, decide.

Model calls happen here, outside any transaction and without holding a database connection (they
take seconds, and dozens of jobs share a pool of a few connections); the decided changes are then
written (memories.memory_writes) and the request marked done (memories.ledger) in one short
transaction, fenced by the worker's claim.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from memories import metrics, selectors
from memories.jobs import connection_release, request_run
from memories.ledger import Claim, memory_request_mark_success
from memories.memory_writes import PlannedChange, memory_job_changes_apply
from memories.models import MemoryRequest
from memories.providers import Embedder, ExistingMemory, LLMProvider
from memories.providers.wiring import get_embedder, get_llm

logger = logging.getLogger(__name__)


def plan_changes(
    *, memory_request: MemoryRequest, llm: LLMProvider, embedder: Embedder
) -> list[PlannedChange]:
    """Decide what the job changes, without writing anything."""
    payload = memory_request.payload
    messages: list[dict[str, Any]] = payload["messages"]
    if not payload.get("infer", True):
        texts = [m["content"] for m in messages if m["role"] != "system"]
        return memories_create_direct(memory_request=memory_request, texts=texts, embedder=embedder)

    with metrics.timed("llm"):
        facts = llm.extract_facts(messages)
    if not facts:
        return []
    with metrics.timed("embedding"):
        fact_vectors = embedder.embed(facts)
    assert memory_request.user_id is not None  # a memory job is always for one user
    with metrics.timed("database"):
        neighbours = selectors.memory_nearest_for_many(
            user_id=memory_request.user_id,
            tenant_id=memory_request.tenant_id,
            scope=payload.get("scope", "user"),
            topic=payload.get("topic", ""),
            vectors=fact_vectors,
            per_vector=settings.MEMORY_NEIGHBOURS_PER_FACT,
        )
    connection_release()  # the decision takes a model call: no connection held meanwhile
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

    changes: list[PlannedChange] = []
    targeted: set[str] = set()
    # A decider that answers one decision per fact, in order (the offline one does), tells which
    # statement closed a memory; a model that does not may say it in the decision's text.
    fact_of = facts if len(decisions) == len(facts) else [None] * len(decisions)
    for decision, fact in zip(decisions, fact_of, strict=True):
        if decision.event == "NONE":
            continue
        if decision.event == "ADD":
            if decision.text:
                changes.append(
                    PlannedChange("ADD", None, decision.text, vector_by_text[decision.text])
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
                PlannedChange("UPDATE", memory_id, decision.text, vector_by_text[decision.text])
            )
        elif decision.event == "DELETE":
            reason = decision.text or fact
            changes.append(PlannedChange("DELETE", memory_id, None, None, reason=reason))
    return changes


def memory_job_work(claim: Claim, memory_request: MemoryRequest) -> None:
    """The work of a memory job, for `jobs.request_run`: plan with the models, then commit.

    No database connection is held while a model answers: the claim's goes back to the pool
    before the first call (and the neighbours' before the second); the commit takes one again."""
    connection_release()
    changes = plan_changes(memory_request=memory_request, llm=get_llm(), embedder=get_embedder())
    with metrics.timed("database"):
        memory_request_complete(claim=claim, changes=changes)


def memory_job_occurred_at(memory_request: MemoryRequest) -> datetime:
    """When the job's conversation happened: its latest message's `timestamp`, or, with none,
    when the job was accepted."""
    stamps = [m["timestamp"] for m in memory_request.payload["messages"] if m.get("timestamp")]
    if not stamps:
        return memory_request.created_at
    return max(datetime.fromisoformat(stamp) for stamp in stamps)


def memory_request_complete(*, claim: Claim, changes: list[PlannedChange]) -> list[dict[str, Any]]:
    """Apply the changes, their history, their events and `success` in ONE transaction, fenced by
    the claim.

    A crash before the commit leaves the request claimable again; after it, a redelivered task
    finds `success` and does nothing. Raises LeaseLost when the claim was taken over (the last
    statement checks the claim token, so nothing of this attempt commits).
    """
    with transaction.atomic():
        result = memory_job_changes_apply(
            memory_request=claim.request,
            changes=changes,
            occurred_at=memory_job_occurred_at(claim.request),
        )
        memory_request_mark_success(claim=claim, result=result)
    return result


def memories_create_direct(
    *, memory_request: MemoryRequest, texts: list[str], embedder: Embedder
) -> list[PlannedChange]:
    """`infer: false`: every message becomes a memory as it is, with no LLM call."""
    with metrics.timed("embedding"):
        vectors = embedder.embed(texts) if texts else []
    return [
        PlannedChange(event="ADD", memory_id=None, content=text, embedding=vector)
        for text, vector in zip(texts, vectors, strict=True)
    ]


def memory_request_run(*, request_id: str) -> str:
    """Run one memory job end to end (see `jobs.request_run` for the outcomes and guarantees)."""
    return request_run(request_id=request_id, work=memory_job_work)
