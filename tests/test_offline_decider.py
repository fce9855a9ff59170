"""The offline decider on negation and change, extraction and decision together.

Each row says what the user told us before, what they say now, and what must happen to the stored
facts. The earlier messages go through the offline extractor, as the pipeline would have stored
them; the new message goes through `extract_facts` then `decide`. The table needs no database;
one test at the end runs the issue's story through the real pipeline.
"""

from __future__ import annotations

import pytest

from memories.models import EndUser, Memory, MemoryRequest
from memories.pipeline import memory_request_run
from memories.providers import Decision, ExistingMemory, RuleBasedLLM
from tests.helpers import submit_job

# Expectations name stored memories by their text, not their id, so a row reads like the story:
#   ("ADD", new text) | ("NONE", stored) | ("DELETE", stored) | ("UPDATE", stored, new text)
Expected = tuple[str, ...]

ROWS: list[tuple[str, str, list[Expected]]] = [
    # --- "no longer": retracts the stored fact, whatever adverbs it carried
    ("I eat meat every day.", "I no longer eat meat.", [("DELETE", "Eats meat every day")]),
    (
        "I play tennis on weekends.",
        "I no longer play tennis.",
        [("DELETE", "Plays tennis on weekends")],
    ),
    ("I'm a vegetarian.", "I'm no longer a vegetarian.", [("DELETE", "Is a vegetarian")]),
    ("I never eat meat.", "I no longer eat meat.", [("NONE", "Never eats meat")]),
    # --- "not ... anymore"
    ("I eat meat a lot.", "I don't eat meat anymore.", [("DELETE", "Eats meat a lot")]),
    ("I'm vegetarian.", "I'm not vegetarian anymore.", [("DELETE", "Is vegetarian")]),
    ("I have a cat.", "I do not have a cat any more.", [("DELETE", "Has a cat")]),
    ("I live in Paris.", "I don't live in Paris anymore.", [("DELETE", "Lives in Paris")]),
    ("I am a smoker.", "I'm not a smoker anymore.", [("DELETE", "Is a smoker")]),
    # --- "stopped", "quit", "gave up", "left"
    ("I smoke.", "I stopped smoking.", [("DELETE", "Smokes")]),
    ("I smoke a pack a day.", "I've stopped smoking.", [("DELETE", "Smokes a pack a day")]),
    (
        "I drink coffee every morning.",
        "I stopped drinking coffee.",
        [("DELETE", "Drinks coffee every morning")],
    ),
    ("I smoke.", "I quit smoking.", [("DELETE", "Smokes")]),
    ("I work at Acme.", "I quit my job at Acme.", [("DELETE", "Works at Acme")]),
    ("I work for Acme.", "I quit my job.", [("DELETE", "Works for Acme")]),
    ("I drink coffee.", "I gave up coffee.", [("DELETE", "Drinks coffee")]),
    ("I work at Acme.", "I left Acme.", [("DELETE", "Works at Acme")]),
    ("I work as a nurse.", "I quit my job.", [("DELETE", "Works as a nurse")]),
    ("I live in Paris.", "I left Paris.", [("DELETE", "Lives in Paris")]),
    ("My wife is Anna.", "I'm not married to Anna anymore.", [("DELETE", "Wife is Anna")]),
    # --- "used to": the stored present fact becomes a past one
    (
        "I live in Rome.",
        "I used to live in Rome.",
        [("UPDATE", "Lives in Rome", "Used to live in Rome")],
    ),
    (
        "I play the piano.",
        "I used to play the piano.",
        [("UPDATE", "Plays the piano", "Used to play the piano")],
    ),
    ("I live in Paris.", "I used to live in Rome.", [("ADD", "Used to live in Rome")]),
    # --- "moved to / from"
    (
        "I live in Paris. I love hiking.",
        "I moved to Berlin.",
        [("UPDATE", "Lives in Paris", "Lives in Berlin")],
    ),
    (
        "I live in Paris.",
        "I moved from Paris to Berlin.",
        [("UPDATE", "Lives in Paris", "Lives in Berlin")],
    ),
    (
        "I live in Paris.",
        "I moved to Berlin from Paris.",
        [("UPDATE", "Lives in Paris", "Lives in Berlin")],
    ),
    (
        "I live in Paris.",
        "I've moved to Lisbon.",
        [("UPDATE", "Lives in Paris", "Lives in Lisbon")],
    ),
    ("I live in Paris.", "I moved away from Paris.", [("DELETE", "Lives in Paris")]),
    (
        "I live in Paris.",
        "I'm living in Berlin now.",
        [("UPDATE", "Lives in Paris", "Lives in Berlin")],
    ),
    # --- "changed my mind" and "actually": the new value replaces the old
    (
        "My favourite colour is blue.",
        "I changed my mind, my favourite colour is green.",
        [("UPDATE", "Favourite colour is blue", "Favourite colour is green")],
    ),
    (
        "My favorite color is blue.",
        "I've changed my mind: my favourite colour is green.",
        [("UPDATE", "Favorite color is blue", "Favourite colour is green")],
    ),
    ("I like tea.", "I changed my mind, I don't like tea.", [("DELETE", "Likes tea")]),
    ("My name is Alex.", "Actually, my name is Sam.", [("UPDATE", "Name is Alex", "Name is Sam")]),
    (
        "I live in Paris.",
        "Actually, I live in Lyon.",
        [("UPDATE", "Lives in Paris", "Lives in Lyon")],
    ),
    # --- "I don't X" against a stored "X"
    ("I eat meat every day.", "I don't eat meat.", [("DELETE", "Eats meat every day")]),
    ("I like jazz.", "I don't like jazz.", [("DELETE", "Likes jazz")]),
    ("I eat meat.", "I never eat meat.", [("DELETE", "Eats meat")]),
    # --- a new value of a single-valued attribute
    ("My name is Alex.", "My name's Sam.", [("UPDATE", "Name is Alex", "Name is Sam")]),
    (
        "I work at Acme.",
        "I work for Globex now.",
        [("UPDATE", "Works at Acme", "Works for Globex")],
    ),
    ("I work at Acme.", "I'm working at Globex.", [("UPDATE", "Works at Acme", "Works at Globex")]),
    ("My wife is Anna.", "My partner is Maria.", [("UPDATE", "Wife is Anna", "Partner is Maria")]),
    ("My wife is Anna.", "My wife is Maria.", [("UPDATE", "Wife is Anna", "Wife is Maria")]),
    (
        "My boyfriend is Tom.",
        "I'm married to Ben.",
        [("UPDATE", "Boyfriend is Tom", "Is married to Ben")],
    ),
    ("I am vegetarian.", "I am vegan.", [("UPDATE", "Is vegetarian", "Is vegan")]),
    (
        "I'm a vegetarian.",
        "I'm pescatarian now.",
        [("UPDATE", "Is a vegetarian", "Is pescatarian")],
    ),
    ("I eat meat every day.", "I'm vegan now.", [("UPDATE", "Eats meat every day", "Is vegan")]),
    (
        "My favourite food is pizza.",
        "My favourite food is sushi.",
        [("UPDATE", "Favourite food is pizza", "Favourite food is sushi")],
    ),
    (
        "I work at Acme.",
        "I started working at Globex.",
        [("UPDATE", "Works at Acme", "Works at Globex")],
    ),
    ("I work at Acme.", "I'm retired now.", [("UPDATE", "Works at Acme", "Is retired")]),
    ("My wife is Anna.", "I'm divorced.", [("UPDATE", "Wife is Anna", "Is divorced")]),
    # --- taking a retraction back
    (
        "I don't eat meat anymore.",
        "I eat meat again.",
        [("UPDATE", "No longer eats meat", "Eats meat")],
    ),
    ("I stopped smoking.", "I started smoking again.", [("UPDATE", "No longer smokes", "Smokes")]),
    # --- several changes in one message, each memory touched once
    (
        "I live in Paris. I eat meat.",
        "I moved to Rome and I no longer eat meat.",
        [("UPDATE", "Lives in Paris", "Lives in Rome"), ("DELETE", "Eats meat")],
    ),
    (
        "I work at Acme.",
        "I quit my job at Acme and I work for Globex now.",
        [("DELETE", "Works at Acme"), ("ADD", "Works for Globex")],
    ),
    # --- negatives: nothing true is lost, nothing known is stored twice
    ("I like to eat fish.", "I no longer eat meat.", [("ADD", "No longer eats meat")]),
    ("I eat fish.", "I don't eat meat anymore.", [("ADD", "No longer eats meat")]),
    ("I live in Paris.", "I no longer play chess.", [("ADD", "No longer plays chess")]),
    ("I like jazz.", "I do not like opera.", [("ADD", "Does not like opera")]),
    ("I drink coffee every morning.", "I don't drink.", [("ADD", "Does not drink")]),
    ("I play chess.", "I don't play chess every day.", [("ADD", "Does not play chess every day")]),
    ("I live in Paris.", "I used to work at Acme.", [("ADD", "Used to work at Acme")]),
    ("My wife is a teacher.", "My wife is Maria.", [("ADD", "Wife is Maria")]),
    (
        "My favorite color is blue.",
        "My favorite food is sushi.",
        [("ADD", "Favorite food is sushi")],
    ),
    ("I live in Paris.", "I live in Paris!", [("NONE", "Lives in Paris")]),
    ("I eat meat every day.", "I eat meat.", [("NONE", "Eats meat every day")]),
    (
        "My favorite color is blue.",
        "My favourite colour is blue.",
        [("NONE", "Favorite color is blue")],
    ),
    ("I no longer eat meat.", "I don't eat meat.", [("NONE", "No longer eats meat")]),
    ("I live in Paris.", "I left my keys at home.", [("ADD", "Left their keys at home")]),
    ("I like Acme products.", "I left Acme.", [("ADD", "Left Acme")]),
    ("I eat meat.", "I don't know anymore.", []),
    ("I like tea.", "I changed my mind.", []),
]


def run(user: EndUser, text: str) -> MemoryRequest:
    memory_request = submit_job(user, text)
    assert memory_request_run(request_id=str(memory_request.id)) == "done"
    memory_request.refresh_from_db()
    return memory_request


def _expected_decision(expected: Expected, id_of: dict[str, int]) -> Decision:
    event, *rest = expected
    if event == "ADD":
        return Decision("ADD", text=rest[0])
    if event == "UPDATE":
        return Decision("UPDATE", text=rest[1], memory_id=id_of[rest[0]])
    return Decision(event, memory_id=id_of[rest[0]])


@pytest.mark.parametrize(
    ("before", "now", "expected"), ROWS, ids=[f"{row[0]} -> {row[1]}" for row in ROWS]
)
def test_offline_decider_keeps_only_what_is_true(
    before: str, now: str, expected: list[Expected]
) -> None:
    llm = RuleBasedLLM()
    stored = llm.extract_facts([{"role": "user", "content": before}])
    memories = [ExistingMemory(number, text) for number, text in enumerate(stored, start=1)]
    id_of = {memory.text: memory.id for memory in memories}
    named = {text for e in expected if e[0] != "ADD" for text in e[1:2]}
    assert named <= id_of.keys(), f"the earlier message was stored as {stored}"

    facts = llm.extract_facts([{"role": "user", "content": now}])
    decisions = llm.decide(facts, memories)

    assert decisions == [_expected_decision(e, id_of) for e in expected]


def test_a_retraction_finds_the_fact_among_unrelated_ones() -> None:
    llm = RuleBasedLLM()
    memories = [
        ExistingMemory(1, "Likes to eat fish"),
        ExistingMemory(2, "Eats meat every day"),
        ExistingMemory(3, "Lives in Paris"),
    ]
    decisions = llm.decide(
        llm.extract_facts([{"role": "user", "content": "I no longer eat meat."}]), memories
    )
    assert decisions == [Decision("DELETE", memory_id=2)]


@pytest.mark.django_db
def test_the_pipeline_closes_the_contradicted_memory_and_keeps_the_rest(end_user) -> None:
    # The story of the issue, through the job: the retraction must reach "Eats meat every day"
    # among the nearest memories the embedder finds, and leave the fish alone.
    run(end_user, "I eat meat every day. I like to eat fish. I live in Paris.")
    request = run(end_user, "I no longer eat meat. Actually, I moved from Paris to Berlin.")
    assert [e["event"] for e in request.result] == ["DELETE", "UPDATE"]
    live = Memory.objects.filter(user=end_user, deleted_at__isnull=True, valid_to__isnull=True)
    assert sorted(live.values_list("content", flat=True)) == [
        "Likes to eat fish",
        "Lives in Berlin",
    ]
    closed = Memory.objects.get(user=end_user, valid_to__isnull=False)
    assert closed.content == "Eats meat every day"  # closed, not erased
