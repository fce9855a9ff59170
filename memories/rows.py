"""Rows written and read in one statement, for the few writes every job makes.

Django's bulk_create and raw querysets do per-field, per-row work in Python (prepare, adapt,
quote, convert) that cost a job more CPU than the database spent on the statement. Here a batch
of rows travels as ONE JSON document, expanded by `json_to_recordset` into typed columns, so
psycopg quotes a single string and orjson (C) encodes the values: UUIDs, aware datetimes, lists
of floats (pgvector reads the JSON array text `[0.1,0.2]` as a vector), dicts for jsonb.

The column types come from the model's fields, so a field added to a model is written with it.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, TypeVar

import orjson
from django.db import connection
from django.db.models import NOT_PROVIDED, Field, Model

M = TypeVar("M", bound=Model)


def _column(field: Field) -> str:
    # Every concrete field has a column; the stubs type it optional for the others.
    assert field.column is not None
    return field.column


def _recordset(model: type[Model], attnames: tuple[str, ...]) -> tuple[str, str, str]:
    """For rows keyed by these attnames: the table's columns, the record's keys, and the
    record's column definitions (`key type, ...`) for json_to_recordset."""
    fields = {f.attname: f for f in model._meta.concrete_fields}
    quote = connection.ops.quote_name
    columns = ", ".join(quote(_column(fields[name])) for name in attnames)
    keys = ", ".join(quote(name) for name in attnames)
    typed = ", ".join(f"{quote(name)} {fields[name].db_type(connection)}" for name in attnames)
    return columns, keys, typed


@cache
def _insert_sql(
    model: type[Model],
    attnames: tuple[str, ...],
    *,
    returning: str | None = None,
    condition: str = "",
    on_conflict: str = "",
) -> str:
    columns, keys, typed = _recordset(model, attnames)
    if returning is None:
        source, order = f"json_to_recordset(%s::json) AS r({typed})", ""
    else:
        # In the rows' order, so that the returned values line up with them.
        source = f"ROWS FROM (json_to_recordset(%s::json) AS ({typed})) WITH ORDINALITY"
        source += f" AS r({keys}, row_number)"
        order = " ORDER BY row_number"
    return (
        f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns})"
        f" SELECT {keys} FROM {source}"
        + (f" WHERE {condition}" if condition else "")
        + order
        + (f" ON CONFLICT {on_conflict}" if on_conflict else "")
        + (f" RETURNING {returning}" if returning else "")
    )


def _to_json(value: Any) -> Any:
    """What orjson (or json) does not encode itself, or TypeError."""
    if hasattr(value, "tolist"):  # a vector as numpy or pgvector hold it
        return value.tolist()
    if isinstance(value, uuid.UUID | datetime.date | datetime.time | decimal.Decimal):
        return str(value)  # for the standard library; PostgreSQL reads the text back the same
    raise TypeError(f"cannot write a {type(value).__name__} as a row value")


def json_bytes(value: Any) -> bytes:
    """JSON as the service writes it to PostgreSQL: rows here, json and jsonb values elsewhere
    (`Json(value, dumps=json_bytes)`, `Jsonb(...)`)."""
    # orjson encodes ~15x faster than json, which showed on every job; json still takes what
    # orjson refuses (an integer beyond 64 bits in a user's metadata), and raises in turn for a
    # value neither can write.
    try:
        return orjson.dumps(value, default=_to_json)
    except TypeError:
        return json.dumps(value, default=_to_json).encode()


def _rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as one JSON array of objects, all with the keys of the first."""
    keys = rows[0].keys()
    if any(row.keys() != keys for row in rows):
        raise ValueError("every row must have the same fields")
    return json_bytes(rows).decode()


def insert_rows(
    model: type[Model],
    rows: Sequence[Mapping[str, Any]],
    *,
    returning: str | None = None,
    condition: str = "",
    condition_params: Sequence[Any] = (),
    on_conflict: str = "",
    preceded_by: str = "",
    preceded_by_params: Sequence[Any] = (),
) -> list[Any]:
    """INSERT the rows (mappings from field attname to value, all with the same keys) into the
    model's table in one statement. Returns the `returning` column of each row inserted, in row
    order (nothing when it is None). Values are written as they are: no defaults, no pre_save.
    `condition` and `on_conflict` are SQL: a WHERE clause (with `condition_params`) and what
    follows ON CONFLICT. `preceded_by` is one statement (with `preceded_by_params`) sent in the
    same round trip before the insert, in the same transaction (an implicit one outside any): a
    lock the insert must hold until it commits, taken before the insert's snapshot."""
    if not rows:
        return []
    sql = _insert_sql(
        model, tuple(rows[0]), returning=returning, condition=condition, on_conflict=on_conflict
    )
    params = [_rows_json(rows), *condition_params]
    if preceded_by:
        sql, params = f"{preceded_by};\n{sql}", [*preceded_by_params, *params]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if preceded_by:
            cursor.nextset()
        return [row[0] for row in cursor.fetchall()] if returning else []


@cache
def _stored_fields(model: type[Model]) -> tuple[tuple[Field, ...], tuple[str, ...]]:
    """The fields an INSERT writes (not those the database computes, GeneratedField), and the
    attnames among them with a database default (db_default), which is an expression until the
    row is saved."""
    stored = tuple(f for f in model._meta.concrete_fields if not getattr(f, "generated", False))
    with_db_default = tuple(f.attname for f in stored if f.db_default is not NOT_PROVIDED)
    return stored, with_db_default


def instance_row(instance: Model) -> dict[str, Any]:
    """Every stored field of the instance, by attname, as `insert_rows` takes them."""
    stored, with_db_default = _stored_fields(type(instance))
    row = {f.attname: getattr(instance, f.attname) for f in stored}
    if any(hasattr(row[name], "resolve_expression") for name in with_db_default):
        raise ValueError("a database default cannot be written as a row value")
    return row


def insert_instances(instances: Sequence[Model]) -> None:
    """INSERT new model instances, every stored field as set on the instance (the model's
    defaults were applied when each was built; auto_now fields and the primary key must be set
    by the caller: no serial key comes back)."""
    if not instances:
        return
    insert_rows(type(instances[0]), [instance_row(instance) for instance in instances])
    for instance in instances:
        instance._state.adding = False
        instance._state.db = connection.alias


def update_rows(model: type[Model], rows: Sequence[Mapping[str, Any]]) -> None:
    """UPDATE the model's rows named by the primary key in each mapping (attname to value) to the
    other values: one statement per set of fields the mappings carry."""
    if not rows:  # a job of ADDs alone: no cursor either
        return
    by_fields: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_fields.setdefault(tuple(row), []).append(row)
    with connection.cursor() as cursor:
        for attnames, same_fields in by_fields.items():
            cursor.execute(_update_sql(model, attnames), [_rows_json(same_fields)])


@cache
def _update_sql(model: type[Model], attnames: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    fields = {f.attname: f for f in model._meta.concrete_fields}
    pk = model._meta.pk.attname
    _, _, typed = _recordset(model, attnames)
    assignments = ", ".join(
        f"{quote(_column(fields[name]))} = r.{quote(name)}" for name in attnames if name != pk
    )
    return (
        f"UPDATE {quote(model._meta.db_table)} AS t SET {assignments}"
        f" FROM json_to_recordset(%s::json) AS r({typed})"
        f" WHERE t.{quote(_column(model._meta.pk))} = r.{quote(pk)}"
    )


@cache
def _loaded_fields(model: type[Model], exclude: tuple[str, ...]) -> tuple[Field, ...]:
    return tuple(f for f in model._meta.concrete_fields if f.attname not in exclude)


def select_columns(model: type[Model], *, exclude: tuple[str, ...] = (), table: str = "") -> str:
    """The model's columns in field order, less `exclude` (attnames), to RETURN or SELECT for
    `instance_from_row` with the same `exclude`; each qualified by `table` (an alias) if given."""
    quote = connection.ops.quote_name
    prefix = f"{table}." if table else ""
    return ", ".join(prefix + quote(_column(f)) for f in _loaded_fields(model, exclude))


@cache
def _converters(
    model: type[Model], exclude: tuple[str, ...]
) -> tuple[tuple[tuple[Any, ...], Any], ...]:
    """Per field: the backend's and the field's converters, and the expression they are called
    with (what the ORM's compiler does for each column it reads)."""
    converted = []
    for field in _loaded_fields(model, exclude):
        expression = field.get_col(model._meta.db_table)
        functions = tuple(
            connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
        )
        converted.append((functions, expression))
    return tuple(converted)


@cache
def _attnames(model: type[Model], exclude: tuple[str, ...]) -> list[str]:
    return [f.attname for f in _loaded_fields(model, exclude)]


def instance_from_row(model: type[M], row: Sequence[Any], *, exclude: tuple[str, ...] = ()) -> M:
    """A model instance from a row of `select_columns(model, exclude=...)`, as the ORM would have
    loaded it; the excluded fields are deferred (read from the database if touched)."""
    values = []
    for value, (functions, expression) in zip(row, _converters(model, exclude), strict=True):
        for function in functions:
            value = function(value, expression, connection)
        values.append(value)
    return model.from_db(connection.alias, _attnames(model, exclude), values)
