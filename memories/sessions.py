"""Sessions: a conversation's record (start, messages, end with an optional summary)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from memories import signals
from memories.errors import InvalidInput
from memories.models import EndUser, Message, Session
from memories.providers import LLMProvider


def session_start(
    *, user: EndUser, agent_id: str = "", metadata: dict[str, Any] | None = None
) -> Session:
    return Session.objects.create(
        tenant_id=user.tenant_id, user=user, agent_id=agent_id, metadata=metadata or {}
    )


@transaction.atomic
def session_add_messages(*, session: Session, messages: list[dict[str, str]]) -> list[Message]:
    """Append messages (each emits `message.added`); an ended session takes no more."""
    if session.ended_at is not None:
        raise InvalidInput("The session has ended.", field="session_id")
    return [
        Message.objects.create(session=session, role=m["role"], content=m["content"])
        for m in messages
    ]


def session_end(*, session: Session, summarize: bool, llm: LLMProvider | None = None) -> Session:
    """End a session (`session.ended`), optionally with a summary (`summary.created`).

    The summary is the facts the LLM extracts from the conversation, so it costs one model call and
    works with the offline provider too. Ending an ended session changes nothing.
    """
    summary = ""
    if summarize and llm is not None:
        conversation = [{"role": m.role, "content": m.content} for m in session.messages.all()]
        facts = llm.extract_facts(conversation) if conversation else []
        summary = "; ".join(facts) if facts else f"{len(conversation)} messages, no lasting facts."
    with transaction.atomic():
        locked = Session.objects.select_for_update().get(pk=session.pk)
        if locked.ended_at is not None:
            return locked
        locked.ended_at = timezone.now()
        locked.summary = summary
        locked.save(update_fields=["ended_at", "summary"])
        if summary:
            signals.summary_created.send(sender=Session, session=locked)
    return locked
