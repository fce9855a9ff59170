"""Consumer groups on the real event stream: at-least-once, takeover, dead letters, analytics."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from django.core.management import call_command
from django.db import transaction

from memories import audit as audit_module
from memories import sessions, signals
from memories.audit import audit_record
from memories.consumer_groups import consumer_for
from memories.events import publisher
from memories.events.analytics import analytics_record_many, analytics_summary
from memories.events.consumers import StreamConsumer
from memories.events.stream import (
    DEAD_LETTER_KEY,
    DROPPED_KEY,
    STREAM_KEY,
    StreamEntry,
    redis_client,
)
from memories.metrics import EVENTS_DROPPED
from memories.models import AuditLogEntry, EndUser, Session
from tests.helpers import wait_for
from tests.workers import BASE_DIR

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def empty_stream() -> None:
    """Start from an empty stream: no groups, dead letters or counters from other tests."""
    client = redis_client()
    keys = [STREAM_KEY, DEAD_LETTER_KEY, *client.scan_iter(f"{STREAM_KEY}:errors:*")]
    client.delete(*keys, *client.scan_iter("analytics:*"))


def run_session(user: EndUser, messages: int = 2, *, end: bool = True) -> Session:
    """session.started, `messages` x message.added, then session.ended: each committed."""
    session = sessions.session_start(user=user, agent_id="bot")
    if messages:
        sessions.session_add_messages(
            session=session,
            messages=[{"role": "user", "content": f"message {i}"} for i in range(messages)],
        )
    if end:
        sessions.session_end(session=session, summarize=False)
    return session


def report_error(user: EndUser) -> None:
    with transaction.atomic():
        signals.error_occurred.send(
            sender=None, tenant_id=user.tenant_id, user_id=user.id, error="boom", request_id=None
        )


def stream_ids() -> list[str]:
    return [entry_id for entry_id, _ in redis_client().xrange(STREAM_KEY)]


def pending(group: str) -> int:
    return redis_client().xpending(STREAM_KEY, group)["pending"]


def caught_up(groups: set[str]) -> bool:
    """Every group has read up to the stream's last entry and acked everything."""
    last = stream_ids()[-1]
    info = {g["name"]: g for g in redis_client().xinfo_groups(STREAM_KEY)}
    return all(
        g in info and info[g]["last-delivered-id"] == last and info[g]["pending"] == 0
        for g in groups
    )


def test_audit_writes_one_row_per_event_even_when_entries_are_redelivered(end_user) -> None:
    run_session(end_user, messages=2)
    ids = stream_ids()
    assert len(ids) == 4
    handled: list[str] = []

    def audit(stream_id: str, event: dict) -> None:
        handled.append(stream_id)
        audit_record(stream_id, event)

    consumer = StreamConsumer(group="audit", handler=audit, consumer="a1")
    assert consumer.drain() == 4
    # Redeliver everything: rewind the group, as after a crash before the acks.
    redis_client().xgroup_setid(STREAM_KEY, "audit", "0")
    assert consumer.drain() == 4

    assert handled == ids + ids
    rows = list(AuditLogEntry.objects.order_by("stream_id"))
    assert [row.stream_id for row in rows] == ids
    assert [row.event_type for row in rows] == [
        "session.started", "message.added", "message.added", "session.ended",
    ]  # fmt: skip
    assert {row.tenant_id for row in rows} == {end_user.tenant_id}
    assert {row.user_id for row in rows} == {end_user.id}
    assert pending("audit") == 0


def test_entries_pending_on_a_dead_consumer_are_taken_over_after_the_idle_time(end_user) -> None:
    run_session(end_user, messages=3)
    consumer_for("audit").ensure_group()
    # Consumer A reads the entries, then dies before handling or acking them.
    taken = redis_client().xreadgroup("audit", "A", {STREAM_KEY: ">"}, count=100)
    assert len(taken[0][1]) == 5 and pending("audit") == 5

    # Not idle long enough (the default is 30 s): B leaves them to A.
    assert consumer_for("audit", consumer="B").drain() == 0
    assert AuditLogEntry.objects.count() == 0

    time.sleep(0.2)
    assert consumer_for("audit", consumer="B", claim_idle_ms=100).drain() == 5
    assert sorted(AuditLogEntry.objects.values_list("stream_id", flat=True)) == stream_ids()
    assert pending("audit") == 0


def test_an_entry_whose_handler_keeps_failing_is_dead_lettered_after_the_limit(end_user) -> None:
    sessions.session_start(user=end_user)
    report_error(end_user)
    poison_id = stream_ids()[1]
    calls: Counter[str] = Counter()

    def flaky(stream_id: str, event: dict) -> None:
        calls[event["event_type"]] += 1
        if event["event_type"] == "error.occurred":
            raise RuntimeError("handler broke")

    consumer = StreamConsumer(
        group="flaky", handler=flaky, consumer="c1", claim_idle_ms=0, max_deliveries=3
    )
    consumer.drain()

    assert calls == {"session.started": 1, "error.occurred": 3}
    [(_, dead)] = redis_client().xrange(DEAD_LETTER_KEY)
    assert dead["group"] == "flaky"
    assert dead["original_id"] == poison_id
    assert dead["deliveries"] == "3"
    assert dead["last_error"] == "RuntimeError: handler broke"
    assert dead["type"] == "error.occurred" and '"error.occurred"' in dead["event"]
    assert pending("flaky") == 0
    assert not redis_client().exists(f"{STREAM_KEY}:errors:flaky")


def test_analytics_summary_counts_a_known_sequence_once(end_user, other_tenant) -> None:
    run_session(end_user, messages=3)  # started, 3 messages, ended
    run_session(end_user, messages=0, end=False)  # started, still active
    report_error(end_user)
    consumer = consumer_for("analytics", consumer="an1")
    assert consumer.drain() == 7
    redis_client().xgroup_setid(STREAM_KEY, "analytics", "0")  # redelivered: counted once
    assert consumer.drain() == 7

    assert analytics_summary(str(end_user.tenant_id)) == {
        "total_events": 7,
        "by_type": {
            "error.occurred": 1, "message.added": 3, "session.ended": 1, "session.started": 2,
        },
        "top_event_types": [
            ["message.added", 3], ["session.started", 2], ["error.occurred", 1],
            ["session.ended", 1],
        ],
        "events_per_second": round(7 / 60, 4),
        "error_rate": round(1 / 7, 4),
        "active_sessions": 1,
    }  # fmt: skip
    assert analytics_summary(str(other_tenant.id)) == {
        "total_events": 0, "by_type": {}, "top_event_types": [], "events_per_second": 0.0,
        "error_rate": 0.0, "active_sessions": 0,
    }  # fmt: skip


def test_analytics_acknowledges_what_it_counts_in_the_same_step(end_user) -> None:
    """A consumer that dies after counting, before the engine's own XACK, leaves nothing pending:
    no other consumer can take the entries over and count them again, however late. So the
    per-event markers need only outlive the relay's copies: minutes, not an hour."""
    run_session(end_user, messages=2)
    client = redis_client()
    client.xgroup_create(STREAM_KEY, "analytics", id="0")
    read = client.xreadgroup("analytics", "dies", {STREAM_KEY: ">"}, count=100)
    entries = [StreamEntry(entry_id, fields) for entry_id, fields in read[0][1]]
    assert pending("analytics") == 4
    analytics_record_many(entries)  # counted; the consumer dies before its engine acknowledges
    assert pending("analytics") == 0
    taken_over = consumer_for("analytics", consumer="heir", claim_idle_ms=0)
    assert taken_over.drain() == 0
    assert analytics_summary(str(end_user.tenant_id))["total_events"] == 4
    markers = client.keys("analytics:seen:*")
    assert len(markers) == 4
    assert all(0 < client.ttl(marker) <= 600 for marker in markers)


def test_consume_events_once_runs_every_group(end_user) -> None:
    run_session(end_user, messages=1)
    out = io.StringIO()
    call_command("consume_events", "--once", "--consumer", "cli", stdout=out)
    assert out.getvalue().split("\n")[:3] == [
        "audit: 3 entries", "analytics: 3 entries", "webhooks: 3 entries",
    ]  # fmt: skip
    assert AuditLogEntry.objects.count() == 3
    assert analytics_summary(str(end_user.tenant_id))["total_events"] == 3
    assert all(pending(group) == 0 for group in ("audit", "analytics", "webhooks"))


def test_consume_events_process_follows_the_stream_and_stops_on_sigterm(
    end_user, worker_env
) -> None:
    process = subprocess.Popen(
        [sys.executable, "manage.py", "consume_events", "--consumer", "proc"],
        cwd=BASE_DIR, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        run_session(end_user, messages=1)
        wait_for(lambda: AuditLogEntry.objects.count() == 3, what="the audit rows")
        wait_for(lambda: caught_up({"audit", "analytics", "webhooks"}), what="every group")
        assert analytics_summary(str(end_user.tenant_id))["total_events"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- Trimming never loses an event silently -------------------------------------------------


def test_a_stopped_audit_consumer_finds_every_event_after_the_retention_trim(
    end_user, settings
) -> None:
    settings.EVENT_STREAM_MAX_AGE_SECONDS = 0  # every entry is past retention at once
    for group in ("audit", "analytics", "webhooks"):
        consumer_for(group).ensure_group()
    run_session(end_user, messages=8)  # 10 events
    consumer_for("analytics").drain()
    consumer_for("webhooks").drain()
    assert publisher.trim_stream() == 0  # audit (stopped) has not read them: nothing goes
    assert consumer_for("audit").drain() == 10
    assert AuditLogEntry.objects.count() == 10
    assert publisher.trim_stream() == 10  # read by every group now, and old: gone
    assert redis_client().xlen(STREAM_KEY) == 0


def test_past_the_ceiling_unread_entries_are_dropped_counted_and_listed(end_user, settings) -> None:
    settings.EVENT_STREAM_MAXLEN = 6
    client = redis_client()
    client.delete(DROPPED_KEY)
    consumer_for("audit").ensure_group()
    run_session(end_user, messages=8)  # 10 events, none read by audit
    oldest = stream_ids()[:4]
    before = EVENTS_DROPPED._value.get()
    publisher.trim_stream()
    assert client.xlen(STREAM_KEY) == 6
    assert EVENTS_DROPPED._value.get() - before == 4
    assert client.lrange(DROPPED_KEY, 0, -1) == oldest[::-1]  # newest first
    assert consumer_for("audit").drain() == 6


def test_an_event_published_twice_is_audited_and_counted_once(end_user) -> None:
    # The relay sends again what a dying process published but had not marked.
    run_session(end_user, messages=0, end=False)
    [(_, fields)] = redis_client().xrange(STREAM_KEY)
    event = json.loads(fields["event"])
    publisher._send([event])
    assert len(stream_ids()) == 2
    consumer_for("audit").drain()
    consumer_for("analytics").drain()
    assert AuditLogEntry.objects.count() == 1
    assert analytics_summary(str(end_user.tenant_id))["total_events"] == 1


def test_a_session_older_than_the_stream_is_told_from_its_rows(api, end_user) -> None:
    session = run_session(end_user, messages=2, end=True)
    from_stream = api.get(f"/v1/sessions/{session.id}/reconstruct").json()
    redis_client().delete(STREAM_KEY)  # retention ran out
    from_rows = api.get(f"/v1/sessions/{session.id}/reconstruct").json()
    assert from_rows["messages"] == from_stream["messages"] != []
    assert from_rows["ended_at"] == from_stream["ended_at"] is not None
    timeline = api.get(f"/v1/sessions/{session.id}/timeline").json()["timeline"]
    assert [e["event_type"] for e in timeline] == [
        "session.started",
        "message.added",
        "message.added",
        "session.ended",
    ]


def test_audit_of_a_whole_read_writes_the_rows_one_entry_at_a_time_would(end_user) -> None:
    run_session(end_user, messages=3)
    report_error(end_user)
    entries = [
        (entry_id, json.loads(f["event"])) for entry_id, f in redis_client().xrange(STREAM_KEY)
    ]
    expected = {
        str(row.event_id): row
        for row in (audit_module._entry(entry_id, event) for entry_id, event in entries)
    }
    consumer = consumer_for("audit", consumer="bulk")
    assert consumer.handle_many is audit_module.audit_record_many
    assert consumer.drain() == 6
    redis_client().xgroup_setid(STREAM_KEY, "audit", "0")  # redelivered: written once
    assert consumer.drain() == 6

    rows = list(AuditLogEntry.objects.all())
    assert len(rows) == 6
    fields = ["stream_id", "event_type", "tenant_id", "user_id", "session_id", "occurred_at"]
    for row in rows:
        want = expected[str(row.event_id)]
        assert [str(getattr(row, f)) for f in fields] == [str(getattr(want, f)) for f in fields]
        assert row.payload == want.payload
    assert pending("audit") == 0


def test_a_read_the_bulk_handler_fails_on_is_handled_entry_by_entry(end_user) -> None:
    sessions.session_start(user=end_user)
    report_error(end_user)
    sessions.session_start(user=end_user)
    poison_id = stream_ids()[1]
    handled: list[str] = []

    def many(entries: list[tuple[str, dict]]) -> None:
        if any(event["event_type"] == "error.occurred" for _, event in entries):
            raise RuntimeError("one bad entry")
        handled.extend(stream_id for stream_id, _ in entries)

    def one(stream_id: str, event: dict) -> None:
        many([(stream_id, event)])

    consumer = StreamConsumer(group="mixed", handler=one, handle_many=many, consumer="m1")
    assert consumer.drain() == 3

    assert handled == [stream_ids()[0], stream_ids()[2]]  # the others, each alone
    assert pending("mixed") == 1  # the bad one is left for a retry, then the dead letters
    errors = redis_client().hgetall(f"{STREAM_KEY}:errors:mixed")
    assert errors == {poison_id: "RuntimeError: one bad entry"}
