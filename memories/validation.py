"""Checks of input shared by the API's serializers and the batch validation."""

from __future__ import annotations

import re
from typing import Any

# What PostgreSQL's text and jsonb cannot hold: U+0000, and lone surrogates (no UTF-8 form).
# DRF's CharField refuses both, with these messages.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_text(value: Any) -> str | None:
    """Why a JSON value cannot be stored (a string or key holding U+0000 or a lone surrogate, at
    any depth), or None when it can."""
    pending = [value]
    while pending:  # a loop, not recursion: a deeply nested body must not raise RecursionError
        item = pending.pop()
        if isinstance(item, str):
            found = _UNSTORABLE.search(item)
            if found:
                if found.group() == "\x00":
                    return "Null characters are not allowed."
                return f"Surrogate characters are not allowed: U+{ord(found.group()):X}."
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def first_unstorable(fields: dict[str, Any]) -> tuple[str, str] | None:
    """The first of these named values that cannot be stored, with why; None when all can."""
    for name, value in fields.items():
        problem = unstorable_text(value)
        if problem:
            return name, problem
    return None
