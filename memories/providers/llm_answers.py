"""Reading a model's answer: the JSON found wherever the model put it, checked against a schema.

Not every OpenAI-compatible server honours `response_format`: local models wrap the JSON in
fences or prose, think aloud first, rename keys, change the case of words and quote numbers.
What is unambiguous is accepted; everything else is refused with a reason in our words, which
the repair prompt shows the model and a failed job shows the tenant. An id is never guessed: it
is an integer as the model wrote it ("3" and "#3" included) or nothing, and whether the model was
shown it is for the caller to check.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from memories.providers.base import Decision, MemoryEvent


class UnreadableAnswer(Exception):
    """No JSON in the answer fits the schema; the message says why, for the model and for us."""


# Keys as models spell them, compared after _key() (lower case, "_" for spaces and dashes).
_FACT_LISTS = ("facts", "memories", "memory", "items", "results", "result", "data", "output")
_DECISION_LISTS = (
    "memory",
    "memories",
    "decisions",
    "events",
    "actions",
    "operations",
    "items",
    "results",
    "changes",
    "updates",
)
_EVENT_KEYS = ("event", "action", "operation", "op", "decision", "type")
_ID_KEYS = ("id", "memory_id", "memoryid", "mem_id", "target_id", "existing_id")
_TEXT_KEYS = ("text", "content", "memory", "fact", "new_text", "new_memory", "new_content")
# Words models use for the four events; anything else stays an unknown event and is refused.
_EVENT_WORDS = {
    "CREATE": "ADD",
    "INSERT": "ADD",
    "MODIFY": "UPDATE",
    "EDIT": "UPDATE",
    "REMOVE": "DELETE",
    "NOOP": "NONE",
    "NO_OP": "NONE",
    "NOTHING": "NONE",
    "SKIP": "NONE",
    "KEEP": "NONE",
    "NO_CHANGE": "NONE",
}
_NEEDS_ID = ("UPDATE", "DELETE")
_NEEDS_TEXT = ("ADD", "UPDATE")

# Reasoning models (DeepSeek-R1, Qwen3) think aloud before answering, braces and all.
_THINKING = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.S | re.I)
_FENCE = re.compile(r"```[ \t]*(?:json5?|javascript|js)?[ \t]*\n?(.*?)```", re.S | re.I)
_OPENING = re.compile(r"[\[{]")
_ID = re.compile(r"#?\s*(\d+)")
_MAX_EMBEDDED_TRIES = 200  # a long ramble full of brackets must not cost a quadratic scan


def read_facts(content: str | None) -> list[str]:
    """The facts of an extraction answer; raises UnreadableAnswer."""
    return _read(content, _FactsAnswer).facts


def read_decisions(content: str | None) -> list[Decision]:
    """The decisions of a decide answer, ids as the model wrote them; raises UnreadableAnswer."""
    return [item.decision() for item in _read(content, _DecisionsAnswer).memory]


def _read(content: str | None, schema: type[A]) -> A:
    if not content or not content.strip():
        raise UnreadableAnswer("the answer was empty")
    first_error: ValidationError | None = None
    for value in _json_values(content):
        try:
            return schema.model_validate(value)
        except ValidationError as exc:
            first_error = first_error or exc
    if first_error is None:
        raise UnreadableAnswer("the answer holds no JSON object")
    raise UnreadableAnswer(f"the JSON does not fit the format asked for: {_reason(first_error)}")


def _json_values(content: str) -> Iterator[Any]:
    """The JSON objects and arrays in `content`, most likely first: the whole text, each fenced
    block, then each value embedded in prose (outermost only: an inner value belongs to its
    parent, and reading it alone would drop its siblings)."""
    text = _THINKING.sub("", content).strip()
    seen: list[Any] = []
    for chunk in [text, *(m.group(1).strip() for m in _FENCE.finditer(text))]:
        value = _loads(chunk)
        if value is not None and value not in seen:
            seen.append(value)
            yield value
    decoder = json.JSONDecoder()
    position, tries = 0, 0
    while tries < _MAX_EMBEDDED_TRIES and (match := _OPENING.search(text, position)):
        tries += 1
        try:
            value, position = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            position = match.start() + 1
            continue
        if value not in seen:
            seen.append(value)
            yield value


def _loads(chunk: str) -> dict[str, Any] | list[Any] | None:
    """`chunk` as a JSON object or array; also a Python literal (single quotes, trailing commas:
    what small models write) and JSON encoded twice (a string holding the JSON)."""
    value: Any
    try:
        value = json.loads(chunk)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(chunk)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict | list) else None


def _key(name: object) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _keyed(value: dict[Any, Any]) -> dict[str, Any]:
    return {_key(name): item for name, item in value.items()}


def _first(keyed: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        if name in keyed:
            return name, keyed[name]
    return None


def _the_list(value: Any, names: tuple[str, ...], *, depth: int = 0) -> Any:
    """The list an answer carries: the answer itself if bare, else the value under one of
    `names`, else its only list, else the list inside its only object ({"response": {...}})."""
    if not isinstance(value, dict):
        return value  # a list, or something validation will refuse in its own words
    keyed = _keyed(value)
    named = _first(keyed, names)
    if named is not None:
        return named[1]
    lists = [item for item in keyed.values() if isinstance(item, list)]
    if len(lists) == 1:
        return lists[0]
    objects = [item for item in keyed.values() if isinstance(item, dict)]
    if not lists and len(objects) == 1 and depth < 2:
        return _the_list(objects[0], names, depth=depth + 1)
    raise ValueError(f'the answer has no "{names[0]}" list')


def _text_of(item: Any) -> Any:
    """A fact written as an object ({"fact": "..."}) is its text; anything else as it is."""
    if isinstance(item, dict):
        found = _first(_keyed(item), _TEXT_KEYS)
        if found is not None and isinstance(found[1], str):
            return found[1]
    return item


def _event(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    word = _key(value).upper()
    return _EVENT_WORDS.get(word, word)


def _memory_id(value: Any) -> int | None:
    """An integer id as written: 3, "3", "#3". Anything else is no id at all."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and (match := _ID.fullmatch(value.strip())):
        return int(match.group(1))
    return None


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


A = TypeVar("A", bound=_Answer)


class _FactsAnswer(_Answer):
    facts: list[str]

    @model_validator(mode="before")
    @classmethod
    def _find_the_list(cls, value: Any) -> Any:
        facts = _the_list(value, _FACT_LISTS)
        return {"facts": [_text_of(item) for item in facts] if isinstance(facts, list) else facts}

    @field_validator("facts")
    @classmethod
    def _strip(cls, facts: list[str]) -> list[str]:
        return [fact.strip() for fact in facts if fact.strip()]


class _DecisionItem(_Answer):
    event: MemoryEvent
    id: int | None = None
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # refused by validation: "should be a valid dictionary"
        keyed = _keyed(value)
        normal: dict[str, Any] = {}
        event = _first(keyed, _EVENT_KEYS)
        if event is not None:
            normal["event"] = _event(event[1])
        text = _first(keyed, _TEXT_KEYS)
        if text is not None:
            normal["text"] = (text[1].strip() or None) if isinstance(text[1], str) else text[1]
        written = _first(keyed, _ID_KEYS)
        if written is not None and written[1] not in (None, ""):
            memory_id = _memory_id(written[1])
            if memory_id is None and normal.get("event") in _NEEDS_ID:
                raise ValueError(
                    f"{normal['event']} needs the integer id of a memory shown, "
                    f"not {_excerpt(repr(written[1]), 40)}"
                )
            normal["id"] = memory_id
        return normal

    @model_validator(mode="after")
    def _complete(self) -> _DecisionItem:
        if self.event in _NEEDS_TEXT and not self.text:
            raise ValueError(f'{self.event} needs a "text"')
        if self.event in _NEEDS_ID and self.id is None:
            raise ValueError(f'{self.event} needs the "id" of a memory shown')
        return self

    def decision(self) -> Decision:
        return Decision(
            event=self.event, text=self.text, memory_id=None if self.event == "ADD" else self.id
        )


class _DecisionsAnswer(_Answer):
    memory: list[_DecisionItem]

    @model_validator(mode="before")
    @classmethod
    def _find_the_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and _first(_keyed(value), _EVENT_KEYS) is not None:
            return {"memory": [value]}  # one decision, not wrapped in a list
        return {"memory": _the_list(value, _DECISION_LISTS)}


def _reason(error: ValidationError, limit: int = 5) -> str:
    """A validation error in a line: where in the answer, and what was wrong there."""
    problems = error.errors(include_url=False)
    parts = []
    for problem in problems[:limit]:
        where = ".".join(str(part) for part in problem["loc"])
        what = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "model_type":  # pydantic would name our class
            what = "Input should be an object"
        if problem["type"] in (
            "literal_error",
            "string_type",
            "int_type",
            "list_type",
            "model_type",
        ):
            what += f", got {_excerpt(repr(problem['input']), 40)}"
        parts.append(f"{where}: {what}" if where else what)
    if len(problems) > limit:
        parts.append(f"and {len(problems) - limit} more")
    return "; ".join(parts)


def _excerpt(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
