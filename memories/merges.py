"""How concurrent writes to one memory combine: vector clocks (who has seen what), a
last-writer-wins register (`fact`, `preference`, `conversation`), an add-wins observed-remove set
(`list`) and a PN-counter (`counter`).

Pure: no Django, no I/O. Every state is plain JSON (dicts, lists, strings, ints) so a service can
store it in a jsonb column as it is and compare what it reads back with `==`. Every merge here is
commutative, associative and idempotent, and every function returns a new value (never mutates its
arguments): replicas that receive the same changes in any order, any number of times, end equal.
tests/test_merges.py checks this with hypothesis over interleavings of three agents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

Clock = dict[str, int]
ClockOrder = Literal["equal", "before", "after", "concurrent"]


# --- Vector clocks -------------------------------------------------------------------------------
# A missing agent counts as 0, and zeros are dropped from what we return, so that `{}` and
# `{"a": 0}` are one clock and compare equal as stored JSON too.


def _clean(clock: Mapping[str, int]) -> Clock:
    return {agent: int(n) for agent, n in sorted(clock.items()) if n > 0}


def clock_descends(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """True when `a` has seen everything `b` has (a >= b pointwise), itself included."""
    return all(a.get(agent, 0) >= n for agent, n in b.items())


def clock_compare(a: Mapping[str, int], b: Mapping[str, int]) -> ClockOrder:
    """Where `a` stands relative to `b`: "before" means b has seen all of a and more."""
    a_ge, b_ge = clock_descends(a, b), clock_descends(b, a)
    if a_ge and b_ge:
        return "equal"
    if a_ge:
        return "after"
    if b_ge:
        return "before"
    return "concurrent"


def clock_merge(a: Mapping[str, int], b: Mapping[str, int]) -> Clock:
    """What a replica knows after seeing both: the pointwise max."""
    return _clean({agent: max(a.get(agent, 0), b.get(agent, 0)) for agent in {*a, *b}})


def clock_tick(clock: Mapping[str, int], agent_id: str, *, by: int = 1) -> Clock:
    """The clock after `agent_id` makes a change (`by` > 1 when one write uses several dots)."""
    return _clean({**clock, agent_id: clock.get(agent_id, 0) + by})


def is_concurrent(*, base_clock: Mapping[str, int], current_clock: Mapping[str, int]) -> bool:
    """Whether a write made on top of `base_clock` missed something that is now in `current_clock`.

    A write is "based on the current state" iff its base descends from the current clock
    (base >= current): the writer saw every change the memory holds. Otherwise something happened
    since the base that the writer did not see (current is after the base, or concurrent with it),
    and the write must be merged by the memory's type (or stored as a conflict, or refused with 412)
    instead of simply applied.
    """
    return not clock_descends(base_clock, current_clock)


# --- Times and values ----------------------------------------------------------------------------


def iso_utc(written_at: str | datetime) -> str:
    """One spelling of an aware instant (UTC, always with microseconds), so that two replicas store
    the same string for the same time and equal states compare equal. Naive times are refused:
    which zone they meant is a guess, and a wrong guess reorders writes."""
    moment = datetime.fromisoformat(written_at) if isinstance(written_at, str) else written_at
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"written_at must carry a time zone: {written_at!r}")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_json(value: Any) -> str:
    """The identity of a JSON value: `{"a": 1, "b": 2}` and `{"b": 2, "a": 1}` are one list item."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- Last-writer-wins register (fact, preference, conversation) --------------------------------
# A write is `{"content", "written_at", "agent_id"}`. The winner is the greatest by
# (written_at, agent_id), then by content: a total order, so every replica picks the same winner
# whatever the order the writes arrive in, even for two writes in one microsecond.


def lww_write(*, content: Any, written_at: str | datetime, agent_id: str) -> dict[str, Any]:
    """A write in the stored form."""
    return {"content": content, "written_at": iso_utc(written_at), "agent_id": agent_id}


def _lww_key(write: Mapping[str, Any]) -> tuple[datetime, str, str, str]:
    # The whole write last: extra keys a caller keeps on a write (its version, its clock) must not
    # make two replicas keep different copies of "the same" write.
    moment = datetime.fromisoformat(iso_utc(write["written_at"]))
    whole = canonical_json({**write, "written_at": iso_utc(write["written_at"])})
    return (moment, str(write["agent_id"]), canonical_json(write["content"]), whole)


def lww_winner(current: Mapping[str, Any] | None, incoming: Mapping[str, Any]) -> Mapping[str, Any]:
    """The write that stands: the greater of the two (`current` None means nothing yet)."""
    if current is None or _lww_key(incoming) > _lww_key(current):
        return incoming
    return current


def lww_apply(
    state: Mapping[str, Any] | None, write: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Apply `write` to the register `state`: `(new_state, loser)`.

    `loser` is the write that lost (the old state when `write` wins, else `write` itself), for the
    caller to keep in history as overwritten: across any order of arrival, every write but the final
    winner is reported once. Re-applying the write that already stands loses nothing (None).
    Keys other than content, written_at and agent_id ride along untouched.
    """
    incoming = {**write, "written_at": iso_utc(write["written_at"])}
    if state is None:
        return incoming, None
    current = {**state, "written_at": iso_utc(state["written_at"])}
    if _lww_key(current) == _lww_key(incoming):
        return current, None
    winner = lww_winner(current, incoming)
    return dict(winner), (current if winner is incoming else incoming)


# --- Add-wins observed-remove set (list) --------------------------------------------------------
# State: {"entries": [[agent, counter, value, written_at], ...],
#         "removed": [[agent, counter], ...]}.
# Each added value is tagged with its own dot (agent, counter), unique across replicas because only
# `agent` issues its counters. A remove deletes only the dots its writer had seen; a dot added
# concurrently survives, so "add wins". Removed dots are kept as tombstones: without them, merging
# with a replica that still holds the entry would bring the item back. (Dropping tombstones safely
# needs to know every replica has seen them, which a server cannot know of offline clients.)


def orset_empty() -> dict[str, list[list[Any]]]:
    return {"entries": [], "removed": []}


def _orset(entries: Iterable[Iterable[Any]], removed: Iterable[Iterable[Any]]) -> dict[str, Any]:
    # The normal form: tombstoned entries dropped, both lists deduplicated and sorted, so equal
    # states are equal JSON whatever the order the changes were merged in.
    dead = {(str(agent), int(counter)) for agent, counter in removed}
    live: dict[tuple[str, int], list[Any]] = {}
    for agent, counter, value, written_at in entries:
        dot = (str(agent), int(counter))
        entry = [dot[0], dot[1], value, iso_utc(written_at)]
        # One dot on two values is a caller's bug (orset_add refuses it where it can see it);
        # keeping the greater entry still lets every replica keep the same one.
        if dot not in dead and (
            dot not in live or canonical_json(entry) > canonical_json(live[dot])
        ):
            live[dot] = entry
    return {
        "entries": [live[dot] for dot in sorted(live)],
        "removed": [[agent, counter] for agent, counter in sorted(dead)],
    }


def orset_add(
    state: Mapping[str, Any],
    *,
    agent_id: str,
    counter: int,
    values: Iterable[Any],
    written_at: str | datetime,
) -> dict[str, Any]:
    """Add `values`, the i-th with the dot (agent_id, counter + i).

    `counter` must be greater than any counter `agent_id` used before (its clock entry + 1). The
    write uses len(values) dots, so the caller advances the memory's clock with
    `clock_tick(clock, agent_id, by=len(values))`: a later remove that saw this clock then covers
    every value added here. A value already present gets one more dot (adding it again is what
    makes it survive a concurrent remove).
    """
    if counter < 1:
        raise ValueError("dot counters start at 1 (0 is covered by every clock)")
    at = iso_utc(written_at)
    added = [[agent_id, counter + i, value, at] for i, value in enumerate(values)]
    # A reused dot would be one tag on two values: a remove of one would remove the other.
    used = {(a, c) for a, c, *_ in state["entries"]} | {(a, c) for a, c in state["removed"]}
    if any((agent_id, c) in used for _, c, _, _ in added):
        raise ValueError(
            f"dot counter {counter} of {agent_id!r} already used: tick the clock first"
        )
    return _orset([*state["entries"], *added], state["removed"])


def orset_remove(
    state: Mapping[str, Any], *, values: Iterable[Any], observed: Mapping[str, int] | None
) -> dict[str, Any]:
    """Remove `values`: the dots of those values that the writer had seen.

    A dot (a, c) was seen iff `observed.get(a, 0) >= c`; `observed=None` means the writer saw the
    state as it is now (every dot present). Dots outside `observed` were added concurrently and
    stay. Removing a value that is not there changes nothing.
    """
    doomed = {canonical_json(value) for value in values}
    removed = [
        [agent, counter]
        for agent, counter, value, _ in state["entries"]
        if canonical_json(value) in doomed
        and (observed is None or observed.get(agent, 0) >= counter)
    ]
    return _orset(state["entries"], [*state["removed"], *removed])


def orset_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Both replicas' knowledge: the union of entries and of tombstones (tombstones win)."""
    return _orset([*a["entries"], *b["entries"]], [*a["removed"], *b["removed"]])


def orset_items(state: Mapping[str, Any]) -> list[Any]:
    """The distinct live values, ordered by each value's earliest live dot (written_at, agent,
    counter): a value keeps its place while any of its adds survives, and the order does not
    depend on the order the changes arrived in."""
    first: dict[str, tuple[datetime, str, int, Any]] = {}
    for agent, counter, value, written_at in state["entries"]:
        key = canonical_json(value)
        seen = (datetime.fromisoformat(iso_utc(written_at)), str(agent), int(counter), value)
        if key not in first or seen[:3] < first[key][:3]:
            first[key] = seen
    return [seen[3] for seen in sorted(first.values(), key=lambda seen: seen[:3])]


# --- PN-counter (counter) -----------------------------------------------------------------------
# State: {"p": {agent: total of increments}, "n": {agent: total of decrements}}. Each agent only
# ever grows its own two totals, so the pointwise max of two replicas is the newer of each, and
# value = sum(p) - sum(n) counts every increment exactly once.


def counter_empty() -> dict[str, Clock]:
    return {"p": {}, "n": {}}


def counter_increment(state: Mapping[str, Any], *, agent_id: str, by: int) -> dict[str, Clock]:
    """Add `by` (negative decrements) as `agent_id`'s change."""
    side = "p" if by >= 0 else "n"
    grown = clock_tick(state[side], agent_id, by=abs(by))
    return {"p": _clean(state["p"]), "n": _clean(state["n"]), side: grown}


def counter_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Clock]:
    return {"p": clock_merge(a["p"], b["p"]), "n": clock_merge(a["n"], b["n"])}


def counter_value(state: Mapping[str, Any]) -> int:
    return sum(state["p"].values()) - sum(state["n"].values())
