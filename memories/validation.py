"""Checks of input shared by the API's serializers and the batch validation."""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from memories.errors import InvalidInput

# What PostgreSQL's text and jsonb cannot hold: U+0000, and lone surrogates (no UTF-8 form).
# DRF's CharField refuses both, with these messages.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Deeper values are refused: the JSON encoders between a request and PostgreSQL recurse, and
# a value nested some hundreds deep, which the parser still reads, exhausts their stack.
MAX_JSON_DEPTH = 64


def unstorable_text(value: Any) -> str | None:
    """Why a JSON value cannot be stored (a string or key holding U+0000 or a lone surrogate, at
    any depth; nesting deeper than MAX_JSON_DEPTH), or None when it can."""
    if isinstance(value, str):  # most fields: no walk to set up
        return _text_problem(value)
    pending = [(value, 0)]
    while pending:  # a loop, not recursion: a deeply nested body must not raise RecursionError
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            return f"Nested deeper than {MAX_JSON_DEPTH} levels."
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                return problem
        elif isinstance(item, dict):
            pending.extend((key, depth) for key in item)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return None


def _text_problem(text: str) -> str | None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "Null characters are not allowed."
    return f"Surrogate characters are not allowed: U+{ord(found.group()):X}."


def first_unstorable(fields: dict[str, Any]) -> tuple[str, str] | None:
    """The first of these named values that cannot be stored, with why; None when all can."""
    for name, value in fields.items():
        problem = unstorable_text(value)
        if problem:
            return name, problem
    return None


def parse_datetime_value(value: Any, *, field: str) -> datetime:
    """An ISO 8601 date or date-time; a date is its midnight, a time without offset is UTC."""
    parsed: datetime | None = None
    if isinstance(value, str):
        try:
            parsed = parse_datetime(value)
            if parsed is None and (day := parse_date(value)) is not None:
                parsed = datetime.combine(day, time())
        except ValueError:  # well-formed but impossible, e.g. 2025-02-30
            parsed = None
    if parsed is None:
        raise InvalidInput("Must be an ISO 8601 date or date-time.", field=field)
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    return parsed
