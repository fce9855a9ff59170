"""memories/rows.py on the real database: rows written and read in one statement come back as the
ORM would have written and read them."""

from __future__ import annotations

import decimal
import uuid
from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from memories import rows
from memories.models import Memory, MemoryHistory
from tests.helpers import store_memories

pytestmark = pytest.mark.django_db

AT = datetime(2026, 12, 4, 9, 30, 15, 123456, tzinfo=UTC)


def test_inserted_rows_read_back_through_the_orm_with_their_types_and_ids_in_order(
    end_user,
) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris")
    history = [
        {
            "memory_id": memory.id,
            "event": event,
            "old_content": None,
            "new_content": f"Lives in Paris «{n}» \u00e9t\u00e9",
            "actor": "test",
            "request_id": None,
            "created_at": AT,
            "occurred_at": AT,
        }
        for n, event in enumerate(["ADD", "UPDATE", "DELETE"])
    ]
    with CaptureQueriesContext(connection) as queries:
        ids = rows.insert_rows(MemoryHistory, history, returning="id")
    assert len(queries) == 1
    stored = list(MemoryHistory.objects.filter(memory=memory).order_by("id"))
    assert ids == [row.id for row in stored]
    assert [(row.event, row.new_content, row.old_content) for row in stored] == [
        (h["event"], h["new_content"], None) for h in history
    ]
    assert all(row.created_at == AT for row in stored)  # aware, to the microsecond


def test_a_false_condition_or_a_conflict_inserts_nothing_and_returns_nothing(end_user) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris")
    row = rows.instance_row(memory)
    assert rows.insert_rows(Memory, [row], returning="id", on_conflict="DO NOTHING") == []
    fresh = {**row, "id": uuid.uuid4()}
    assert (
        rows.insert_rows(Memory, [fresh], returning="id", condition="1 = %s", condition_params=[2])
        == []
    )
    assert Memory.objects.count() == 1
    assert rows.insert_rows(Memory, [fresh], returning="id") == [fresh["id"]]


def test_rows_with_different_fields_are_refused_before_anything_is_written(end_user) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris")
    complete = {**rows.instance_row(memory), "id": uuid.uuid4(), "content": "Complete"}
    partial = {key: value for key, value in complete.items() if key != "metadata"}
    with pytest.raises(ValueError, match="same fields"):
        rows.insert_rows(Memory, [complete, {**partial, "id": uuid.uuid4()}])
    assert list(Memory.objects.values_list("content", flat=True)) == ["Lives in Paris"]


def test_new_instances_are_inserted_whole_and_count_as_saved(end_user) -> None:
    memory = Memory(
        tenant=end_user.tenant,
        user=end_user,
        content="Likes tea",
        content_hash="h",
        embedding=[0.5] * 384,
        metadata={"source": "chat", "nested": {"n": 2**70, "price": decimal.Decimal("1.50")}},
        created_at=AT,
        updated_at=AT,
    )
    rows.insert_instances([memory])
    assert memory._state.adding is False
    stored = Memory.objects.get(pk=memory.pk)
    assert stored.metadata == {"source": "chat", "nested": {"n": 2**70, "price": "1.50"}}
    assert list(stored.embedding) == [0.5] * 384
    assert (stored.type, stored.scope, stored.version, stored.created_at) == ("fact", "user", 1, AT)


def test_update_rows_changes_only_the_named_rows_and_fields_one_statement_per_field_set(
    end_user,
) -> None:
    first, second, untouched = store_memories(end_user, "One", "Two", "Three")
    with CaptureQueriesContext(connection) as queries:
        rows.update_rows(
            Memory,
            [
                {"id": first.id, "content": "One!", "version": 2},
                {"id": second.id, "content": "Two!", "version": 5},
                {"id": untouched.id, "metadata": {"seen": True}},
            ],
        )
    assert len(queries) == 2  # (content, version) once for both, metadata once
    contents = dict(Memory.objects.values_list("id", "content"))
    assert (contents[first.id], contents[second.id], contents[untouched.id]) == (
        "One!",
        "Two!",
        "Three",
    )
    versions = dict(Memory.objects.values_list("id", "version"))
    assert (versions[first.id], versions[second.id], versions[untouched.id]) == (2, 5, 1)
    assert Memory.objects.get(pk=untouched.id).metadata == {"seen": True}


def test_a_row_read_by_hand_is_the_instance_the_orm_reads_with_excluded_fields_deferred(
    end_user,
) -> None:
    (memory,) = store_memories(end_user, "Lives in Paris", metadata={"k": "v"})
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {rows.select_columns(Memory, exclude=('embedding',))}"
            f" FROM {Memory._meta.db_table} WHERE id = %s",
            [memory.id],
        )
        loaded = rows.instance_from_row(Memory, cursor.fetchone(), exclude=("embedding",))
    orm = Memory.objects.get(pk=memory.id)
    for field in Memory._meta.concrete_fields:
        if field.attname != "embedding":
            assert getattr(loaded, field.attname) == getattr(orm, field.attname), field.attname
    assert loaded.get_deferred_fields() == {"embedding"}
    with CaptureQueriesContext(connection) as queries:
        assert list(loaded.embedding) == list(orm.embedding)  # read when touched
    assert len(queries) == 1


def test_values_no_json_encoder_can_write_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot write a object"):
        rows.json_bytes({"value": object()})
