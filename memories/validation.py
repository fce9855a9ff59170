"""Checks of input shared by the API's serializers and the batch validation."""

from __future__ import annotations

from typing import Any

# PostgreSQL's text and jsonb cannot hold U+0000; DRF's CharField refuses it with this message.
NULL_CHARACTER_MESSAGE = "Null characters are not allowed."


def contains_null_character(value: Any) -> bool:
    """Whether a JSON value holds U+0000 in any string or key, at any depth."""
    pending = [value]
    while pending:  # a loop, not recursion: a deeply nested body must not raise RecursionError
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
