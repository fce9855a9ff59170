"""Providers for any OpenAI-compatible endpoint: OpenAI, Azure, vLLM, Ollama.

Every failure, whether of the transport or of the answer's shape, becomes a ProviderError with a
message a person can act on; nothing the model says is trusted before it has been checked.
"""

from __future__ import annotations

import json
from typing import Any

import openai

from memories.providers.base import Decision, ExistingMemory, ProviderError

EXTRACT_PROMPT = """\
You extract durable facts about the user from a conversation between the user and an assistant.
Keep only facts that will still be true and useful later: who the user is, where they live and
work, their preferences, relationships, plans, habits, and facts they retract ("No longer eats
meat"). Ignore greetings, questions, small talk and anything the assistant says about itself.
Write each fact as a short third-person sentence without a subject, e.g. "Lives in Paris",
"Likes hiking", "Name is Alice".
The conversation arrives as JSON: {"conversation": [{"role": ..., "content": ...}, ...]}.
Answer with a JSON object and nothing else: {"facts": ["...", "..."]}. No facts: {"facts": []}."""

# Memories are shown with ids 1..n, not their UUIDs: models copy short integers reliably, while
# long UUIDs come back subtly altered or invented. The caller maps the numbers back.
DECIDE_PROMPT = """\
You maintain a store of memories about a user. You get the existing memories, each with an
integer id, and new facts. For each new fact choose one event:
- "ADD": the fact is new; give its "text".
- "UPDATE": the fact changes an existing memory (a new city, a new employer, a corrected value);
  give the memory's "id" and the new "text".
- "DELETE": the fact says an existing memory is no longer true; give the memory's "id".
- "NONE": the fact is already stored; give the memory's "id".
Only use ids from the existing memories. Never target the same id twice.
The input arrives as JSON: {"memories": [{"id": 1, "text": "..."}], "facts": ["..."]}.
Answer with a JSON object and nothing else:
{"memory": [{"event": "ADD" | "UPDATE" | "DELETE" | "NONE", "id": <int>, "text": "..."}]}"""

_EVENTS = {"ADD", "UPDATE", "DELETE", "NONE"}


def _client(api_key: str, base_url: str, timeout: float, max_retries: int) -> openai.OpenAI:
    # Local endpoints (vLLM, Ollama) need no key, but the client refuses to start without one.
    return openai.OpenAI(
        api_key=api_key or "no-key", base_url=base_url, timeout=timeout, max_retries=max_retries
    )


def _excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class OpenAILLM:
    """An LLMProvider over the chat completions API, answering in JSON mode."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        timeout: float = 60.0,
        max_retries: int = 1,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self._client = _client(api_key, base_url, timeout, max_retries)

    def extract_facts(self, messages: list[dict[str, str]]) -> list[str]:
        if not messages:
            return []
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        answer = self._chat(EXTRACT_PROMPT, {"conversation": conversation}, key="facts")
        facts = answer["facts"]
        if not all(isinstance(fact, str) for fact in facts):
            raise ProviderError(f"{self._who()} returned non-text facts: {_excerpt(str(facts))}")
        return [fact.strip() for fact in facts if fact.strip()]

    def decide(self, facts: list[str], memories: list[ExistingMemory]) -> list[Decision]:
        if not facts:
            return []
        shown = [{"id": m.id, "text": m.text} for m in memories]
        answer = self._chat(DECIDE_PROMPT, {"memories": shown, "facts": facts}, key="memory")
        return [self._decision(item) for item in answer["memory"]]

    def _who(self) -> str:
        return f"model {self.model} at {self.base_url}"

    def _chat(self, system: str, payload: dict[str, Any], *, key: str) -> dict[str, Any]:
        """One JSON-mode call; returns the answer once it is an object with a list under `key`."""
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": json.dumps(payload, ensure_ascii=False)},
                ],
                response_format={"type": "json_object"},
                temperature=0,
            )
        except openai.OpenAIError as exc:
            raise ProviderError(_failure(self._who(), exc)) from exc
        content = response.choices[0].message.content if response.choices else None
        if not content:
            raise ProviderError(f"{self._who()} returned an empty answer")
        try:
            answer = json.loads(content)
        except json.JSONDecodeError as exc:
            raise ProviderError(
                f"{self._who()} returned invalid JSON ({exc.msg}): {_excerpt(content)}"
            ) from exc
        if not isinstance(answer, dict) or not isinstance(answer.get(key), list):
            raise ProviderError(
                f'{self._who()} answered without a "{key}" list: {_excerpt(content)}'
            )
        return answer

    def _decision(self, item: object) -> Decision:
        if not isinstance(item, dict):
            raise ProviderError(
                f"{self._who()} returned a decision that is not an object: {item!r}"
            )
        event = str(item.get("event", "")).upper()
        if event not in _EVENTS:
            raise ProviderError(f"{self._who()} returned an unknown event: {_excerpt(str(item))}")
        text = item.get("text")
        if event in ("ADD", "UPDATE") and not (isinstance(text, str) and text.strip()):
            raise ProviderError(f"{self._who()} returned {event} without text: {item!r}")
        memory_id = _memory_id(item.get("id"))
        if event in ("UPDATE", "DELETE") and memory_id is None:
            raise ProviderError(f"{self._who()} returned {event} without a valid id: {item!r}")
        return Decision(
            event=event,  # type: ignore[arg-type]  # checked against _EVENTS above
            text=text.strip() if isinstance(text, str) and text.strip() else None,
            memory_id=None if event == "ADD" else memory_id,
        )


def _memory_id(value: object) -> int | None:
    """An id as int; models sometimes quote numbers. Unknown ids pass through for the caller."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


class OpenAIEmbedder:
    """An Embedder over the embeddings API: all texts in one request."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        dimensions: int,
        send_dimensions: bool = True,
        timeout: float = 60.0,
        max_retries: int = 1,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.dimensions = dimensions
        # Only some models (text-embedding-3-*) accept `dimensions`; others reject the request.
        self.send_dimensions = send_dimensions
        self._client = _client(api_key, base_url, timeout, max_retries)

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        who = f"embedding model {self.model} at {self.base_url}"
        options: dict[str, Any] = {"dimensions": self.dimensions} if self.send_dimensions else {}
        try:
            # "float" explicitly: the client otherwise asks for base64, which not every server has.
            response = self._client.embeddings.create(
                model=self.model, input=texts, encoding_format="float", **options
            )
        except openai.OpenAIError as exc:
            raise ProviderError(_failure(who, exc)) from exc
        data = sorted(response.data, key=lambda item: item.index)
        if [item.index for item in data] != list(range(len(texts))):
            raise ProviderError(f"{who} returned {len(data)} vectors for {len(texts)} texts")
        vectors = [[float(x) for x in item.embedding] for item in data]
        for vector in vectors:
            if len(vector) != self.dimensions:
                raise ProviderError(
                    f"{who} returned {len(vector)} dimensions, {self.dimensions} are configured"
                )
        return vectors


def _failure(who: str, exc: openai.OpenAIError) -> str:
    """Our words for a failed call: the error's kind and HTTP status, never the provider's text
    (which tenants would read back in a job's error); the log has the whole exception."""
    status = getattr(exc, "status_code", None)
    return f"{who} failed ({type(exc).__name__}{f', HTTP {status}' if status else ''})"
