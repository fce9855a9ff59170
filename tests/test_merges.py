"""The merge rules of memories.merges: vector clocks, the LWW register, the add-wins OR-set and the
PN-counter. Property-based: three agents make changes on their own replicas, now and then syncing
with each other; every change is also kept as a state delta, and replicas that merge the same
deltas in any order (and any number of times) must end equal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memories.merges import (
    canonical_json,
    clock_compare,
    clock_descends,
    clock_merge,
    clock_tick,
    counter_empty,
    counter_increment,
    counter_merge,
    counter_value,
    is_concurrent,
    lww_apply,
    lww_winner,
    lww_write,
    orset_add,
    orset_empty,
    orset_items,
    orset_merge,
    orset_remove,
)

AGENTS = ("a", "b", "c")
T0 = datetime(2025, 1, 1, tzinfo=UTC)
# Few values and few instants, so that the same item and the same written_at come up often.
VALUES = st.sampled_from(["milk", "eggs", 7, {"k": [1, 2]}, ["x"], None])
TIMES = st.integers(min_value=0, max_value=3).map(lambda s: T0 + timedelta(seconds=s))
CLOCKS = st.dictionaries(st.sampled_from(AGENTS), st.integers(min_value=0, max_value=4))
FLIP = {"equal": "equal", "before": "after", "after": "before", "concurrent": "concurrent"}

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(AGENTS), st.lists(VALUES, max_size=3), TIMES),
        st.tuples(st.just("remove"), st.sampled_from(AGENTS), st.lists(VALUES, max_size=2)),
        st.tuples(st.just("sync"), st.sampled_from(AGENTS), st.sampled_from(AGENTS)),
    ),
    max_size=25,
)
counter_ops = st.lists(
    st.one_of(
        st.tuples(st.just("inc"), st.sampled_from(AGENTS), st.integers(-5, 5)),
        st.tuples(st.just("sync"), st.sampled_from(AGENTS), st.sampled_from(AGENTS)),
    ),
    max_size=25,
)


def run_orset(script: list[tuple[Any, ...]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Play `script` on one replica per agent: (final replicas, every change as a delta)."""
    replicas: dict[str, Any] = {agent: (orset_empty(), {}) for agent in AGENTS}
    deltas = []
    for op in script:
        state, clock = replicas[op[1]]
        if op[0] == "add":
            _, agent, values, at = op
            delta = orset_add(
                orset_empty(),
                agent_id=agent,
                counter=clock.get(agent, 0) + 1,
                values=values,
                written_at=at,
            )
            clock = clock_tick(clock, agent, by=len(values))
        elif op[0] == "remove":
            # What the writer saw is its replica's clock: it covers exactly the dots it holds.
            delta = {
                "entries": [],
                "removed": orset_remove(state, values=op[2], observed=clock)["removed"],
            }
        else:
            other_state, other_clock = replicas[op[2]]
            delta = other_state
            clock = clock_merge(clock, other_clock)
        replicas[op[1]] = (orset_merge(state, delta), clock)
        if op[0] != "sync":
            deltas.append(delta)
    return {agent: state for agent, (state, _) in replicas.items()}, deltas


def run_counter(script: list[tuple[Any, ...]]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    replicas: dict[str, Any] = {agent: counter_empty() for agent in AGENTS}
    deltas, total = [], 0
    for op in script:
        if op[0] == "inc":
            _, agent, by = op
            grown = counter_increment(replicas[agent], agent_id=agent, by=by)
            # The delta is only this agent's totals: what a PATCH {"increment": n} sends on.
            delta = {
                side: {agent: grown[side][agent]} if agent in grown[side] else {} for side in "pn"
            }
            deltas.append(delta)
            total += by
            replicas[agent] = counter_merge(replicas[agent], delta)
        else:
            replicas[op[1]] = counter_merge(replicas[op[1]], replicas[op[2]])
    return replicas, deltas, total


def shuffled_with_repeats(data: st.DataObject, items: list[Any]) -> list[Any]:
    """`items` in an order hypothesis picks, some of them delivered twice."""
    order = data.draw(st.permutations(items)) if items else []
    again = data.draw(st.lists(st.sampled_from(items), max_size=3)) if items else []
    return [*order, *again]


# --- Vector clocks -------------------------------------------------------------------------------


@given(CLOCKS, CLOCKS, CLOCKS)
def test_clock_merge_is_commutative_associative_idempotent_and_an_upper_bound(a, b, c):
    assert clock_merge(a, b) == clock_merge(b, a)
    assert clock_merge(clock_merge(a, b), c) == clock_merge(a, clock_merge(b, c))
    assert clock_merge(a, a) == clock_merge(a, {})
    assert clock_descends(clock_merge(a, b), a) and clock_descends(clock_merge(a, b), b)


@given(CLOCKS, CLOCKS, st.sampled_from(AGENTS))
def test_clock_compare_is_antisymmetric_and_a_tick_comes_after(a, b, agent):
    assert clock_compare(a, b) == FLIP[clock_compare(b, a)]
    assert clock_compare(clock_tick(a, agent), a) == "after"
    assert (clock_compare(a, b) in ("equal", "after")) == clock_descends(a, b)


def test_clock_compare_cases_and_zero_entries_are_absent():
    assert clock_compare({"a": 1, "b": 0}, {"a": 1}) == "equal"
    assert clock_compare({"a": 1}, {"a": 2}) == "before"
    assert clock_compare({"a": 2, "b": 1}, {"a": 2}) == "after"
    assert clock_compare({"a": 2}, {"b": 1}) == "concurrent"
    assert clock_merge({"a": 2, "c": 0}, {"a": 1, "b": 3}) == {"a": 2, "b": 3}
    assert clock_tick({}, "a") == {"a": 1}


def test_a_write_is_concurrent_unless_its_base_has_seen_the_current_clock():
    assert not is_concurrent(base_clock={"a": 2}, current_clock={"a": 2})
    assert not is_concurrent(base_clock={"a": 2, "b": 1}, current_clock={"a": 2})
    assert is_concurrent(base_clock={"a": 1}, current_clock={"a": 2})  # missed a's second write
    assert is_concurrent(base_clock={"a": 2}, current_clock={"a": 1, "b": 1})


# --- LWW register --------------------------------------------------------------------------------

writes = st.lists(
    st.builds(
        lambda content, at, agent: lww_write(content=content, written_at=at, agent_id=agent),
        st.sampled_from(["tea", "coffee", "water"]),
        TIMES,
        st.sampled_from(AGENTS),
    ),
    min_size=1,
    max_size=8,
    unique_by=canonical_json,
)


@given(writes, st.data())
def test_lww_converges_in_any_order_and_reports_every_loser_once(all_writes, data):
    def play(order):
        state, losers = None, []
        for write in order:
            state, loser = lww_apply(state, write)
            losers.append(loser)
        return state, [loser for loser in losers if loser is not None]

    state, losers = play(all_writes)
    other_state, other_losers = play(data.draw(st.permutations(all_writes)))
    assert state == other_state == reduce(lww_winner, all_writes, None)
    for reported in (losers, other_losers):
        assert sorted(map(canonical_json, reported)) == sorted(
            canonical_json(w) for w in all_writes if w != state
        )
    assert lww_apply(state, state) == (state, None)


def test_lww_later_write_wins_and_ties_go_to_the_greater_agent():
    early = lww_write(content="tea", written_at="2025-01-01T10:00:00+00:00", agent_id="b")
    late = lww_write(content="coffee", written_at=T0.replace(hour=11), agent_id="a")
    assert lww_apply(early, late) == (late, early)
    assert lww_apply(late, early) == (late, early)
    tie = lww_write(content="water", written_at="2025-01-01T12:00:00+02:00", agent_id="c")
    assert tie["written_at"] == "2025-01-01T10:00:00.000000+00:00"
    assert lww_winner(early, tie) == tie and lww_winner(tie, early) == tie


def test_lww_refuses_a_time_without_a_zone():
    with pytest.raises(ValueError, match="time zone"):
        lww_write(content="tea", written_at="2025-01-01T10:00:00", agent_id="a")


# --- Add-wins OR-set (list) ----------------------------------------------------------------------


@given(ops, st.data())
@settings(deadline=None)
def test_orset_replicas_merging_the_same_changes_in_any_order_end_equal(script, data):
    replicas, deltas = run_orset(script)
    in_order = reduce(orset_merge, deltas, orset_empty())
    shuffled = reduce(orset_merge, shuffled_with_repeats(data, deltas), orset_empty())
    assert shuffled == in_order
    assert orset_items(shuffled) == orset_items(in_order)
    # Every replica holds a subset of the changes; all of them together hold them all.
    assert reduce(orset_merge, replicas.values()) == in_order


@given(ops)
@settings(deadline=None)
def test_orset_merge_is_commutative_associative_idempotent(script):
    replicas, _ = run_orset(script)
    a, b, c = (replicas[agent] for agent in AGENTS)
    assert orset_merge(a, b) == orset_merge(b, a)
    assert orset_merge(orset_merge(a, b), c) == orset_merge(a, orset_merge(b, c))
    assert orset_merge(a, a) == a


@given(st.lists(st.tuples(st.booleans(), VALUES), max_size=20))
def test_orset_on_one_replica_behaves_like_a_set(steps):
    state, clock, expected = orset_empty(), {}, set()
    for adding, value in steps:
        if adding:
            state = orset_add(
                state, agent_id="a", counter=clock.get("a", 0) + 1, values=[value], written_at=T0
            )
            clock = clock_tick(clock, "a")
            expected.add(canonical_json(value))
        else:
            state = orset_remove(state, values=[value], observed=clock)
            expected.discard(canonical_json(value))
    assert sorted(map(canonical_json, orset_items(state))) == sorted(expected)


@given(ops, VALUES, st.data())
@settings(deadline=None)
def test_orset_a_concurrent_add_and_remove_of_one_value_resolve_to_present(script, value, data):
    # Whatever happened before: b has seen `value`, removes it; c adds it without seeing b's remove.
    _, deltas = run_orset(
        [
            *script,
            ("add", "a", [value], T0),
            ("sync", "b", "a"),
            ("remove", "b", [value]),
            ("add", "c", [value], T0),
        ]
    )
    merged = reduce(orset_merge, shuffled_with_repeats(data, deltas), orset_empty())
    assert canonical_json(value) in map(canonical_json, orset_items(merged))


def dots_seen(state: dict[str, Any]) -> dict[str, int]:
    """The clock of a replica holding `state`: each agent's highest dot, removed ones included."""
    dots = [(entry[0], entry[1]) for entry in state["entries"]] + [
        tuple(d) for d in state["removed"]
    ]
    return reduce(lambda clock, dot: clock_merge(clock, {dot[0]: dot[1]}), dots, {})


@given(ops, VALUES)
@settings(deadline=None)
def test_orset_a_server_keeps_an_add_the_remover_had_not_seen_whichever_arrives_first(
    script, value
):
    # One server state; b read it (clock `seen`) and sends a remove; c's add lands meanwhile.
    replicas, _ = run_orset(script)
    server = reduce(orset_merge, replicas.values())
    seen = dots_seen(server)

    def add(state):
        return orset_add(
            state, agent_id="c", counter=seen.get("c", 0) + 1, values=[value], written_at=T0
        )

    def remove(state):
        return orset_remove(state, values=[value], observed=seen)

    assert remove(add(server)) == add(remove(server))
    assert canonical_json(value) in map(canonical_json, orset_items(remove(add(server))))
    added = add(server)
    gone = orset_remove(added, values=[value], observed=dots_seen(added))
    assert canonical_json(value) not in map(canonical_json, orset_items(gone))


@given(ops, VALUES, st.data())
@settings(deadline=None)
def test_orset_a_remove_that_observed_every_add_removes_the_value(script, value, data):
    # b syncs with everyone, then removes: it has seen every add of `value` there is.
    full = [
        *script,
        ("add", "a", [value], T0),
        *(("sync", "b", agent) for agent in AGENTS),
        ("remove", "b", [value]),
    ]
    _, deltas = run_orset(full)
    merged = reduce(orset_merge, shuffled_with_repeats(data, deltas), orset_empty())
    assert canonical_json(value) not in map(canonical_json, orset_items(merged))


def test_orset_items_keep_their_first_place_and_ignore_key_order():
    state = orset_add(
        orset_empty(), agent_id="a", counter=1, values=["milk", {"x": 1, "y": 2}], written_at=T0
    )
    later = T0 + timedelta(minutes=1)
    state = orset_add(
        state, agent_id="b", counter=1, values=["eggs", {"y": 2, "x": 1}, "milk"], written_at=later
    )
    assert orset_items(state) == ["milk", {"x": 1, "y": 2}, "eggs"]
    # A remove that saw a's dots but not b's takes milk's first add only: it stays, now later.
    state = orset_remove(state, values=["milk"], observed={"a": 2})
    assert orset_items(state) == [{"x": 1, "y": 2}, "eggs", "milk"]
    assert orset_items(orset_remove(state, values=["milk", "absent"], observed=None)) == [
        {"x": 1, "y": 2},
        "eggs",
    ]


def test_orset_refuses_a_reused_dot_and_a_zero_counter():
    state = orset_add(
        orset_empty(), agent_id="a", counter=1, values=["milk", "eggs"], written_at=T0
    )
    with pytest.raises(ValueError, match="already used"):
        orset_add(state, agent_id="a", counter=2, values=["tea"], written_at=T0)
    with pytest.raises(ValueError, match="start at 1"):
        orset_add(state, agent_id="b", counter=0, values=["tea"], written_at=T0)


def test_orset_state_is_plain_json_in_one_normal_form():
    one = orset_add(
        orset_empty(),
        agent_id="a",
        counter=1,
        values=["milk"],
        written_at="2025-01-01T01:00:00+01:00",
    )
    two = orset_add(
        orset_empty(),
        agent_id="a",
        counter=1,
        values=["milk"],
        written_at=T0.astimezone(timezone(timedelta(hours=-5))),
    )
    assert (
        one
        == two
        == {"entries": [["a", 1, "milk", "2025-01-01T00:00:00.000000+00:00"]], "removed": []}
    )


# --- PN-counter ----------------------------------------------------------------------------------


@given(counter_ops, st.data())
def test_counter_replicas_merging_the_same_increments_in_any_order_agree_on_the_sum(script, data):
    replicas, deltas, total = run_counter(script)
    in_order = reduce(counter_merge, deltas, counter_empty())
    shuffled = reduce(counter_merge, shuffled_with_repeats(data, deltas), counter_empty())
    assert shuffled == in_order == reduce(counter_merge, replicas.values())
    assert counter_value(shuffled) == total


@given(counter_ops)
def test_counter_merge_is_commutative_associative_idempotent(script):
    replicas, _, _ = run_counter(script)
    a, b, c = (replicas[agent] for agent in AGENTS)
    assert counter_merge(a, b) == counter_merge(b, a)
    assert counter_merge(counter_merge(a, b), c) == counter_merge(a, counter_merge(b, c))
    assert counter_merge(a, a) == a


def test_counter_counts_increments_and_decrements_per_agent():
    state = counter_increment(counter_empty(), agent_id="a", by=3)
    state = counter_increment(state, agent_id="b", by=-5)
    state = counter_increment(state, agent_id="a", by=0)
    assert state == {"p": {"a": 3}, "n": {"b": 5}}
    assert counter_value(state) == -2
