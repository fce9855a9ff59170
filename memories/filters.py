"""Memory filters: what a list or a search may ask for, checked (a 400 naming the field) and
turned into one `Q`, so every filter is pushed into the SQL and never applied after a LIMIT.

    {"agent_id": "a", "session_id": "s", "type": "fact", "scope": "user",
     "occurred_at": {"gte": "2025-05-01", "lt": "2025-06-01"},      # created_at, updated_at too
     "metadata": {"project": "x",                                   # containment, as before
                  "priority": {"gte": 2}, "tag": {"in": ["a", "b"]}, "archived": {"exists": false}}}

In `metadata`, a value that is an object with exactly one key, an operator, is that operator;
any other value must be contained (JSONB `@>`, served by the GIN index).
"""

from __future__ import annotations

from typing import Any

from django.db.models import Func, Q, TextField, Value
from django.db.models.fields.json import JSONField, KeyTransform
from django.db.models.lookups import (
    Exact,
    GreaterThan,
    GreaterThanOrEqual,
    LessThan,
    LessThanOrEqual,
)

from memories.errors import InvalidInput
from memories.models import Memory
from memories.validation import parse_datetime_value, unstorable_text

EQUAL_FIELDS = ("agent_id", "session_id")
CHOICE_FIELDS = {
    "type": tuple(choice for choice, _ in Memory.Type.choices),
    "scope": tuple(choice for choice, _ in Memory.Scope.choices),
}
DATE_FIELDS = ("created_at", "updated_at", "occurred_at")
FIELDS = (*EQUAL_FIELDS, *CHOICE_FIELDS, *DATE_FIELDS, "metadata")
_COMPARISONS = {
    "gt": GreaterThan,
    "gte": GreaterThanOrEqual,
    "lt": LessThan,
    "lte": LessThanOrEqual,
}
METADATA_OPERATORS = ("eq", "ne", *_COMPARISONS, "in", "nin", "exists")


def memory_filters_parse(raw: Any, *, prefix: str = "filters") -> dict[str, Any]:
    """The filters, checked and normalised (dates parsed); InvalidInput names the first bad
    field as `<prefix>.<name>[.<key>]` (no prefix: the bare name, for query parameters)."""

    def name(*parts: str) -> str:
        return ".".join(part for part in (prefix, *parts) if part)

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput("Must be a JSON object.", field=prefix or "filters")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"Unknown filter; known: {', '.join(FIELDS)}.", field=name(unknown[0]))
    parsed: dict[str, Any] = {}
    for field in EQUAL_FIELDS:
        value = raw.get(field)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or len(value) > 200:
            raise InvalidInput("Must be a string of at most 200 characters.", field=name(field))
        parsed[field] = value
    for field, choices in CHOICE_FIELDS.items():
        value = raw.get(field)
        if value in (None, ""):
            continue
        if value not in choices:
            raise InvalidInput(f"Must be one of {', '.join(choices)}.", field=name(field))
        parsed[field] = value
    for field in DATE_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        if not isinstance(value, dict) or not value or set(value) - set(_COMPARISONS):
            raise InvalidInput(
                'Must be an object of gt, gte, lt, lte, e.g. {"gte": "2025-05-01"}.',
                field=name(field),
            )
        parsed[field] = {
            op: parse_datetime_value(bound, field=name(field, op)) for op, bound in value.items()
        }
    if raw.get("metadata") is not None:
        parsed["metadata"] = _metadata_parse(raw["metadata"], field=name("metadata"))
    return parsed


def _metadata_parse(raw: Any, *, field: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput("Must be a JSON object.", field=field)
    problem = unstorable_text(raw)  # what jsonb cannot hold, no memory holds either
    if problem:
        raise InvalidInput(problem, field=field)
    for key, value in raw.items():
        operator = _operator(value)
        if operator is None:
            continue
        operand, where = value[operator], f"{field}.{key}"
        if operator in _COMPARISONS and (
            isinstance(operand, bool) or not isinstance(operand, int | float | str)
        ):
            raise InvalidInput(f"{operator} takes a number or a string.", field=where)
        if operator in ("in", "nin") and not (isinstance(operand, list) and operand):
            raise InvalidInput(f"{operator} takes a non-empty list.", field=where)
        if operator == "exists" and not isinstance(operand, bool):
            raise InvalidInput("exists takes true or false.", field=where)
    return raw


def _operator(value: Any) -> str | None:
    """The operator a metadata value names: an object of exactly one operator key."""
    if isinstance(value, dict) and len(value) == 1:
        (key,) = value
        if key in METADATA_OPERATORS:
            return str(key)
    return None


def memory_filters_q(filters: dict[str, Any]) -> Q:
    """The parsed filters as one Q over Memory."""
    q = Q()
    for field in (*EQUAL_FIELDS, *CHOICE_FIELDS):
        if field in filters:
            q &= Q(**{field: filters[field]})
    for field in DATE_FIELDS:
        for op, bound in filters.get(field, {}).items():
            q &= Q(**{f"{field}__{op}": bound})
    contained: dict[str, Any] = {}
    for key, value in filters.get("metadata", {}).items():
        operator = _operator(value)
        if operator is None:
            contained[key] = value
        else:
            q &= _metadata_q(key, operator, value[operator])
    if contained:
        q &= Q(metadata__contains=contained)
    return q


def _metadata_q(key: str, operator: str, operand: Any) -> Q:
    if operator == "eq":
        return Q(metadata__contains={key: operand})
    if operator == "ne":
        return ~Q(metadata__contains={key: operand})
    if operator == "in":
        return _any_contains(key, operand)
    if operator == "nin":
        return ~_any_contains(key, operand)
    if operator == "exists":
        return Q(metadata__has_key=key) if operand else ~Q(metadata__has_key=key)
    # jsonb orders values of different kinds too (true > 2 > "2"): compare like with like.
    value = KeyTransform(key, "metadata")
    kind = "number" if isinstance(operand, int | float) else "string"
    same_kind = Exact(Func(value, function="jsonb_typeof", output_field=TextField()), Value(kind))
    compared = _COMPARISONS[operator](value, Value(operand, output_field=JSONField()))
    return Q(same_kind) & Q(compared)


def _any_contains(key: str, values: list[Any]) -> Q:
    q = Q()
    for value in values:
        q |= Q(metadata__contains={key: value})
    return q
