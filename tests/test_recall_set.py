"""The labelled set of bench/recall.py is well formed: enough users, memories and queries, every
memory dated, every label pointing at a memory of the same user, and each category honest about
what it claims (a paraphrase shares no content word with its answer; a temporal query's answers
are dated in the month it names; a multi-hop query needs two memories)."""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parent.parent / "bench" / "data" / "recall_set.json"
CATEGORIES = {"keyword", "paraphrase", "temporal", "multi_hop", "negation"}
MONTHS = [datetime.date(2000, n, 1).strftime("%B").lower() for n in range(1, 13)]
# Words too common to count as shared content: a paraphrase may use them freely.
STOP_WORDS = frozenset(
    re.split(
        r"\s+",
        "a an the and or of to in on at for with by from is are was were be been has have had do "
        "does did what which who whom where when why how any she he her his him they their them "
        "it its this that these those there new now still after before about into over than then "
        "so as if not no yes can could would should will got get one two",
    )
)


@pytest.fixture(scope="module")
def recall_set() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def _queries(recall_set: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(user, query) for user in recall_set["users"] for query in user["queries"]]


def _content_words(text: str) -> set[str]:
    """Crude stems of the words that carry meaning: an inflection off, then five letters."""
    stems = set()
    for word in re.findall(r"[^\W\d_]+", text.lower()):  # "Maya's" -> "maya", "s"
        if len(word) < 3 or word in STOP_WORDS:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        stems.add(word[:5])
    return stems


def test_the_set_has_ten_users_300_memories_and_150_queries(recall_set) -> None:
    users = recall_set["users"]
    assert len(users) >= 10
    assert sum(len(user["memories"]) for user in users) >= 300
    assert sum(len(user["queries"]) for user in users) >= 150
    for user in users:
        assert len(user["memories"]) >= 30, user["id"]
        assert len(user["queries"]) >= 15, user["id"]


def test_ids_are_unique_and_every_label_names_a_memory_of_the_same_user(recall_set) -> None:
    memory_ids = [m["id"] for user in recall_set["users"] for m in user["memories"]]
    query_ids = [q["id"] for _, q in _queries(recall_set)]
    assert len(set(memory_ids)) == len(memory_ids)
    assert len(set(query_ids)) == len(query_ids)
    for user, query in _queries(recall_set):
        own = {memory["id"] for memory in user["memories"]}
        assert query["relevant"], query["id"]
        assert len(set(query["relevant"])) == len(query["relevant"]), query["id"]
        assert set(query["relevant"]) <= own, query["id"]


def test_every_memory_has_a_date_and_distinct_content(recall_set) -> None:
    for user in recall_set["users"]:
        contents = [memory["content"].strip() for memory in user["memories"]]
        assert all(contents) and len(set(contents)) == len(contents), user["id"]
        for memory in user["memories"]:
            datetime.date.fromisoformat(memory["date"])  # raises on a missing or bad date


def test_every_category_is_known_and_used_by_every_user(recall_set) -> None:
    for user in recall_set["users"]:
        used = Counter(query["category"] for query in user["queries"])
        assert set(used) == CATEGORIES, user["id"]


def test_a_paraphrase_shares_no_content_word_with_its_answers(recall_set) -> None:
    for user, query in _queries(recall_set):
        if query["category"] != "paraphrase":
            continue
        memories = {memory["id"]: memory for memory in user["memories"]}
        asked = _content_words(query["query"]) - _content_words(user["name"])
        for memory_id in query["relevant"]:
            shared = asked & _content_words(memories[memory_id]["content"])
            assert not shared, (query["id"], memory_id, shared)


def test_a_temporal_query_names_a_month_and_its_answers_are_dated_in_it(recall_set) -> None:
    month_year = re.compile(rf"\b({'|'.join(MONTHS)}) (\d{{4}})\b")
    for user, query in _queries(recall_set):
        if query["category"] != "temporal":
            continue
        named = month_year.search(query["query"].lower())
        assert named, query["id"]
        prefix = f"{named.group(2)}-{MONTHS.index(named.group(1)) + 1:02d}"
        dates = {memory["id"]: memory["date"] for memory in user["memories"]}
        assert all(dates[m].startswith(prefix) for m in query["relevant"]), query["id"]


def test_a_multi_hop_query_needs_at_least_two_memories(recall_set) -> None:
    for _, query in _queries(recall_set):
        if query["category"] == "multi_hop":
            assert len(query["relevant"]) >= 2, query["id"]
