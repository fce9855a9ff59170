"""Rows written and read in one statement, for the few writes every job makes.

Django's bulk_create and raw querysets do per-field, per-row work in Python (prepare, adapt,
quote, convert) that cost a job more CPU than the database spent on the statement. Here a batch
of rows travels as ONE JSON document, expanded by `json_to_recordset` into typed columns, so
psycopg quotes a single string and orjson (C) encodes the values: UUIDs, aware datetimes, lists
of floats (pgvector reads the JSON array text `[0.1,0.2]` as a vector), dicts for jsonb.

The column types come from the model's fields, so a field added to a model is written with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, TypeVar

import orjson
from django.db import connection
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)


def _fields_by_attname(model: type[Model]) -> dict[str, Field]:
    return {f.attname: f for f in model._meta.concrete_fields}


@cache
def _insert_sql(model: type[Model], attnames: tuple[str, ...], returning: str | None) -> str:
    fields = _fields_by_attname(model)
    columns = ", ".join(fields[name].column for name in attnames)
    typed = ", ".join(f"{fields[n].column} {fields[n].db_type(connection)}" for n in attnames)
    if returning is None:
        source = f"json_to_recordset(%s::json) AS r({typed})"
        tail = ""
    else:
        # In the rows' order, so that the returned values line up with them.
        source = f"ROWS FROM (json_to_recordset(%s::json) AS ({typed})) WITH ORDINALITY AS r"
        source += f"({columns}, row_number)"
        tail = f" ORDER BY row_number RETURNING {returning}"
    return f"INSERT INTO {model._meta.db_table} ({columns}) SELECT {columns} FROM {source}{tail}"


def _to_json(value: Any) -> Any:
    if hasattr(value, "tolist"):  # a vector as numpy or pgvector hold it
        return value.tolist()
    return str(value)  # UUIDs and datetimes, for the standard library


def rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as one JSON array of objects."""
    try:
        return orjson.dumps(rows, default=_to_json).decode()
    except TypeError:
        # What orjson refuses (an integer beyond 64 bits in a user's metadata): the standard
        # library, with UUIDs and datetimes as their text, which PostgreSQL reads back the same.
        return json.dumps(rows, default=_to_json)


def insert_rows(
    model: type[Model], rows: Sequence[Mapping[str, Any]], *, returning: str | None = None
) -> list[Any]:
    """INSERT the rows (mappings from field attname to value, all with the same keys) into the
    model's table in one statement. Returns the `returning` column of each row, in row order
    (nothing when it is None). Values are written as they are: no defaults, no pre_save."""
    if not rows:
        return []
    sql = _insert_sql(model, tuple(rows[0]), returning)
    with connection.cursor() as cursor:
        cursor.execute(sql, [rows_json(rows)])
        return [row[0] for row in cursor.fetchall()] if returning else []


def insert_instances(instances: Sequence[Model]) -> None:
    """INSERT new model instances, every concrete field as set on the instance (the model's
    defaults were applied when each was built; auto_now fields must be set by the caller)."""
    if not instances:
        return
    fields = type(instances[0])._meta.concrete_fields
    insert_rows(
        type(instances[0]),
        [{f.attname: getattr(instance, f.attname) for f in fields} for instance in instances],
    )
    for instance in instances:
        instance._state.adding = False
        instance._state.db = connection.alias


def select_columns(model: type[Model]) -> str:
    """The model's columns in field order, to RETURN or SELECT for `instance_from_row`."""
    return ", ".join(f.column for f in model._meta.concrete_fields)


@cache
def _converters(model: type[Model]) -> tuple[tuple[tuple[Any, ...], Any], ...]:
    """Per field: the backend's and the field's converters, and the expression they are called
    with (what the ORM's compiler does for each column it reads)."""
    converted = []
    for field in model._meta.concrete_fields:
        expression = field.get_col(model._meta.db_table)
        functions = tuple(
            connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
        )
        converted.append((functions, expression))
    return tuple(converted)


@cache
def _attnames(model: type[Model]) -> list[str]:
    return [f.attname for f in model._meta.concrete_fields]


def instance_from_row(model: type[M], row: Sequence[Any]) -> M:
    """A model instance from a row of `select_columns(model)`, as the ORM would have loaded it."""
    values = []
    for value, (functions, expression) in zip(row, _converters(model), strict=True):
        for function in functions:
            value = function(value, expression, connection)
        values.append(value)
    return model.from_db(connection.alias, _attnames(model), values)
