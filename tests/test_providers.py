"""The providers on their own: offline rules, the hashing embedder, and the OpenAI client against
a fake server. No database and no Django needed."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from memories.providers import (
    Decision,
    ExistingMemory,
    HashingEmbedder,
    ProviderConfig,
    ProviderError,
    RuleBasedLLM,
    build_embedder,
    build_llm,
)
from memories.providers.openai_provider import OpenAIEmbedder, OpenAILLM
from tests.fake_openai import FakeOpenAI, FakeResponse

ROOT = Path(__file__).resolve().parent.parent
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def said(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text} for text in texts]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- Offline extraction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "fact"),
    [
        ("I live in Paris", "Lives in Paris"),
        ("I moved to Berlin.", "Lives in Berlin"),
        ("I like hiking", "Likes hiking"),
        ("I'm a software engineer", "Is a software engineer"),
        ("My name is Alice", "Name is Alice"),
        ("My favorite color is blue!", "Favorite color is blue"),
        ("I work at Acme", "Works at Acme"),
        ("I eat meat", "Eats meat"),
        ("I've been to Japan", "Has been to Japan"),
        ("I go to the gym", "Goes to the gym"),
        ("I do yoga", "Does yoga"),
        ("I study law", "Studies law"),
        ("I watch anime", "Watches anime"),
        ("I play chess", "Plays chess"),
        ("I fix bikes", "Fixes bikes"),
        ("I miss my brother", "Misses their brother"),
    ],
)
def test_first_person_statement_becomes_a_third_person_fact(statement: str, fact: str) -> None:
    assert RuleBasedLLM().extract_facts(said(statement)) == [fact]


@pytest.mark.parametrize(
    "statement",
    ["I no longer eat meat", "I don't eat meat anymore", "I stopped eating meat"],
)
def test_giving_something_up_is_extracted_as_a_negated_fact(statement: str) -> None:
    assert RuleBasedLLM().extract_facts(said(statement)) == ["No longer eats meat"]


def test_questions_greetings_and_other_people_yield_no_facts() -> None:
    messages = [
        {"role": "user", "content": "Hello! Where do I live? My sister lives in Rome."},
        {"role": "user", "content": "The weather is nice today. I think it will rain."},
        {"role": "assistant", "content": "I live in the cloud and I like helping."},
    ]
    assert RuleBasedLLM().extract_facts(messages) == []


def test_several_statements_in_one_message_are_all_extracted_once() -> None:
    messages = said("Hi, I'm Tom and I live in Paris. I work at Acme.", "I live in Paris!")
    assert RuleBasedLLM().extract_facts(messages) == ["Is Tom", "Lives in Paris", "Works at Acme"]


# --- Offline decisions ------------------------------------------------------------------------


def test_new_fact_is_added() -> None:
    decisions = RuleBasedLLM().decide(["Likes hiking"], [ExistingMemory(1, "Likes chess")])
    assert decisions == [Decision("ADD", text="Likes hiking")]


def test_moving_city_updates_the_home_memory() -> None:
    llm = RuleBasedLLM()
    facts = llm.extract_facts(said("I moved to Berlin"))
    decisions = llm.decide(
        facts, [ExistingMemory(1, "Likes tea"), ExistingMemory(2, "Lives in Paris")]
    )
    assert decisions == [Decision("UPDATE", text="Lives in Berlin", memory_id=2)]


@pytest.mark.parametrize(
    ("memory", "fact"),
    [
        ("Works at Acme", "Works for Globex"),
        ("Name is Alice", "Name is Alicia"),
        ("Favorite color is blue", "Favorite color is green"),
        ("Is 30 years old", "Is 31 years old"),
    ],
)
def test_a_new_value_of_a_single_valued_fact_replaces_the_old(memory: str, fact: str) -> None:
    decisions = RuleBasedLLM().decide([fact], [ExistingMemory(7, memory)])
    assert decisions == [Decision("UPDATE", text=fact, memory_id=7)]


def test_a_different_favorite_is_added_beside_the_first() -> None:
    decisions = RuleBasedLLM().decide(
        ["Favorite food is pizza"], [ExistingMemory(1, "Favorite color is blue")]
    )
    assert decisions == [Decision("ADD", text="Favorite food is pizza")]


def test_negated_fact_deletes_the_memory_it_retracts() -> None:
    llm = RuleBasedLLM()
    facts = llm.extract_facts(said("I don't eat meat anymore"))
    decisions = llm.decide(
        facts, [ExistingMemory(3, "Lives in Paris"), ExistingMemory(4, "Eats meat")]
    )
    assert decisions == [Decision("DELETE", memory_id=4)]


def test_negated_fact_with_nothing_to_retract_is_added() -> None:
    decisions = RuleBasedLLM().decide(["No longer eats meat"], [ExistingMemory(1, "Likes tea")])
    assert decisions == [Decision("ADD", text="No longer eats meat")]


def test_repeated_fact_changes_nothing() -> None:
    decisions = RuleBasedLLM().decide(["lives  in PARIS"], [ExistingMemory(5, "Lives in Paris")])
    assert decisions == [Decision("NONE", memory_id=5)]


def test_a_memory_is_targeted_at_most_once_per_call() -> None:
    decisions = RuleBasedLLM().decide(
        ["Lives in Berlin", "Lives in Rome", "Lives in Berlin"],
        [ExistingMemory(1, "Lives in Paris")],
    )
    assert decisions == [
        Decision("UPDATE", text="Lives in Berlin", memory_id=1),
        Decision("ADD", text="Lives in Rome"),
        Decision("NONE"),
    ]


# --- Hashing embedder -------------------------------------------------------------------------


def test_hashing_embedder_gives_the_same_vector_in_another_process() -> None:
    text = "Lives in Paris and likes hiking"
    code = (
        "import json; from memories.providers.offline import HashingEmbedder; "
        f"print(json.dumps(HashingEmbedder(64).embed([{text!r}])[0]))"
    )
    # A different hash seed: a vector built on Python's salted hash() would change.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == HashingEmbedder(64).embed([text])[0]


@pytest.mark.parametrize("dimensions", [8, 384])
def test_hashing_vectors_have_the_configured_length_and_unit_norm(dimensions: int) -> None:
    for vector in HashingEmbedder(dimensions).embed(["Likes hiking", "", "?!"]):
        assert len(vector) == dimensions
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0)


def test_texts_sharing_words_are_closer_than_unrelated_ones() -> None:
    home, query, cake = HashingEmbedder().embed(
        ["Lives in Paris", "Where does the user live? Paris", "Likes chocolate cake"]
    )
    assert cosine(home, query) > 0.3
    assert cosine(home, query) > cosine(home, cake) + 0.2


# --- OpenAI provider against the fake server --------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dimensions=16) as server:
        yield server


@pytest.fixture
def llm(fake: FakeOpenAI) -> OpenAILLM:
    return OpenAILLM(
        api_key="test", base_url=fake.base_url, model="fake-llm", timeout=5, max_retries=0
    )


def embedder_for(fake: FakeOpenAI, **options: object) -> OpenAIEmbedder:
    settings: dict = {"dimensions": 16, "timeout": 5, "max_retries": 0} | options
    return OpenAIEmbedder(api_key="test", base_url=fake.base_url, model="fake-embed", **settings)


def test_openai_llm_extracts_facts_in_json_mode(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    facts = llm.extract_facts(said("I live in Paris. I like hiking."))
    assert facts == ["Lives in Paris", "Likes hiking"]
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "fake-llm"
    assert request.body["response_format"] == {"type": "json_object"}
    assert request.body["temperature"] == 0


def test_decide_prompt_shows_small_integer_ids_and_no_uuids(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    memories = [ExistingMemory(1, "Likes tea"), ExistingMemory(2, "Lives in Paris")]
    decisions = llm.decide(["Lives in Berlin"], memories)
    assert decisions == [Decision("UPDATE", text="Lives in Berlin", memory_id=2)]
    messages = fake.requests[0].body["messages"]
    shown = json.loads(messages[-1]["content"])["memories"]
    assert shown == [{"id": 1, "text": "Likes tea"}, {"id": 2, "text": "Lives in Paris"}]
    assert not UUID.search(json.dumps(messages))


def test_ids_the_model_invents_are_passed_through_for_the_caller(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    fake.chat_handler = lambda body: {
        "memory": [
            {"event": "UPDATE", "id": 99, "text": "Lives in Rome"},
            {"event": "delete", "id": "2"},
            {"event": "NONE"},
        ]
    }
    decisions = llm.decide(["Lives in Rome"], [ExistingMemory(2, "Lives in Paris")])
    assert decisions == [
        Decision("UPDATE", text="Lives in Rome", memory_id=99),
        Decision("DELETE", memory_id=2),
        Decision("NONE"),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        "Sure! The facts are: Lives in Paris",
        '{"facts": "Lives in Paris"}',
        '{"facts": [1, 2]}',
        '{"answer": 42}',  # a bare "[]", though, is read as no facts (test_llm_robustness.py)
    ],
)
def test_malformed_extraction_answer_is_a_provider_error(
    fake: FakeOpenAI, llm: OpenAILLM, answer: str
) -> None:
    fake.chat_handler = lambda body: answer
    with pytest.raises(ProviderError, match="fake-llm"):
        llm.extract_facts(said("I live in Paris"))


@pytest.mark.parametrize(
    "item",
    [{"event": "MERGE", "id": 1, "text": "x"}, {"event": "ADD"}, {"event": "DELETE", "id": "one"}],
)
def test_malformed_decision_is_a_provider_error(
    fake: FakeOpenAI, llm: OpenAILLM, item: dict
) -> None:
    fake.chat_handler = lambda body: {"memory": [item]}
    with pytest.raises(ProviderError):
        llm.decide(["Lives in Paris"], [ExistingMemory(1, "Lives in Rome")])


def test_server_error_is_a_provider_error(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.fail_next(1, status=500)
    with pytest.raises(ProviderError, match=r"fake-llm at http://127\.0\.0\.1"):
        llm.extract_facts(said("I live in Paris"))
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]


def test_slow_model_times_out_as_a_provider_error(fake: FakeOpenAI) -> None:
    fake.delay_seconds = 1.0
    llm = OpenAILLM(api_key="k", base_url=fake.base_url, model="slow", timeout=0.2, max_retries=0)
    with pytest.raises(ProviderError, match="slow"):
        llm.extract_facts(said("I live in Paris"))


def test_unreachable_endpoint_is_a_provider_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    llm = OpenAILLM(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    with pytest.raises(ProviderError, match=str(port)):
        llm.extract_facts(said("I live in Paris"))


def test_many_texts_are_embedded_in_one_request(fake: FakeOpenAI) -> None:
    texts = [f"Fact number {i}" for i in range(50)]
    vectors = embedder_for(fake).embed(texts)
    assert [r.path for r in fake.requests] == ["/v1/embeddings"]
    assert fake.requests[0].body["input"] == texts
    assert fake.requests[0].body["dimensions"] == 16
    assert vectors == HashingEmbedder(16).embed(texts)


def test_embeddings_are_returned_in_the_order_of_their_index(fake: FakeOpenAI) -> None:
    rows = [{"object": "embedding", "index": i, "embedding": [float(i)] * 4} for i in (2, 0, 1)]
    fake.embedding_handler = lambda body: FakeResponse(
        200,
        {
            "object": "list",
            "data": rows,
            "model": "m",
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        },
    )
    vectors = embedder_for(fake, dimensions=4).embed(["a", "b", "c"])
    assert [v[0] for v in vectors] == [0.0, 1.0, 2.0]


def test_dimensions_are_not_sent_when_the_model_does_not_take_them(fake: FakeOpenAI) -> None:
    embedder_for(fake, send_dimensions=False).embed(["Likes tea"])
    assert "dimensions" not in fake.requests[0].body


def test_vectors_of_the_wrong_length_are_a_provider_error(fake: FakeOpenAI) -> None:
    embedder = embedder_for(fake, dimensions=32, send_dimensions=False)  # the server answers 16
    with pytest.raises(ProviderError, match="16 dimensions"):
        embedder.embed(["Likes tea"])


def test_missing_vectors_are_a_provider_error(fake: FakeOpenAI) -> None:
    fake.embedding_handler = lambda body: HashingEmbedder(16).embed(body["input"][:1])
    with pytest.raises(ProviderError, match="1 vectors for 2 texts"):
        embedder_for(fake).embed(["Likes tea", "Lives in Paris"])


@pytest.mark.parametrize("body", ["<html>gateway</html>", {"object": "list"}, {"data": [1, 2]}])
def test_an_answer_without_embeddings_is_a_provider_error(fake: FakeOpenAI, body: object) -> None:
    fake.embedding_handler = lambda request: FakeResponse(200, body)  # type: ignore[arg-type]
    with pytest.raises(ProviderError, match="fake-embed"):
        embedder_for(fake).embed(["Likes tea"])


@pytest.mark.parametrize("body", ["<html>gateway</html>", {"choices": "none"}, {"id": "x"}])
def test_a_chat_answer_that_is_not_a_completion_is_a_provider_error(
    fake: FakeOpenAI, llm: OpenAILLM, body: object
) -> None:
    fake.chat_handler = lambda request: FakeResponse(200, body)  # type: ignore[arg-type]
    with pytest.raises(ProviderError, match="fake-llm"):
        llm.extract_facts(said("I live in Paris"))


def test_embedding_server_error_is_a_provider_error(fake: FakeOpenAI) -> None:
    fake.fail_next(1, status=503)
    with pytest.raises(ProviderError, match="fake-embed"):
        embedder_for(fake).embed(["Likes tea"])


def provider_errors(endpoint: str, error: str) -> float:
    value = REGISTRY.get_sample_value(
        "provider_errors_total", {"endpoint": endpoint, "error": error}
    )
    return value or 0.0


def test_failed_model_calls_are_counted_by_endpoint_and_kind(fake: FakeOpenAI) -> None:
    before = {
        key: provider_errors(*key)
        for key in [
            ("llm", "transient"),
            ("llm", "rate_limited"),
            ("llm", "unusable_answer"),
            ("embeddings", "rejected"),
        ]
    }
    # One retry allowed: a 429 then a 500 are both counted, and the third call answers.
    llm = OpenAILLM(api_key="k", base_url=fake.base_url, model="m", timeout=5, max_retries=1)
    fake.fail_next(1, status=429, headers={"Retry-After": "0"})
    fake.fail_next(1, status=500)
    with pytest.raises(ProviderError):
        llm.extract_facts(said("I live in Paris"))
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    fake.chat_handler = lambda body: "no JSON at all"
    with pytest.raises(ProviderError):
        llm.extract_facts(said("I live in Paris"))
    fake.fail_next(1, status=401)
    with pytest.raises(ProviderError):
        embedder_for(fake).embed(["Likes tea"])
    assert provider_errors("llm", "rate_limited") == before[("llm", "rate_limited")] + 1
    assert provider_errors("llm", "transient") == before[("llm", "transient")] + 1
    assert provider_errors("llm", "unusable_answer") == before[("llm", "unusable_answer")] + 1
    assert provider_errors("embeddings", "rejected") == before[("embeddings", "rejected")] + 1


def test_fake_server_runs_as_a_standalone_process() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--port", "0", "--delay", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        llm = OpenAILLM(api_key="k", base_url=base_url, model="m", timeout=5, max_retries=0)
        assert llm.extract_facts(said("I work at Acme")) == ["Works at Acme"]
    finally:
        process.terminate()
        process.wait(timeout=5)


# --- Factories --------------------------------------------------------------------------------


def config(**overrides: object) -> ProviderConfig:
    values: dict = {
        "llm_provider": "offline",
        "embedding_provider": "offline",
        "openai_api_key": "",
        "openai_base_url": "http://127.0.0.1:1/v1",
        "llm_model": "m",
        "embedding_model": "e",
        "embedding_dimensions": 32,
        "embedding_send_dimensions": True,
        "request_timeout": 5.0,
        "client_max_retries": 0,
    } | overrides
    return ProviderConfig(**values)


def test_factories_build_the_named_providers() -> None:
    assert isinstance(build_llm(config()), RuleBasedLLM)
    assert build_embedder(config()).dimensions == 32
    assert isinstance(build_llm(config(llm_provider="openai")), OpenAILLM)
    embedder = build_embedder(config(embedding_provider="openai", embedding_send_dimensions=False))
    assert isinstance(embedder, OpenAIEmbedder) and not embedder.send_dimensions


@pytest.mark.parametrize(
    ("build", "field", "setting"),
    [
        (build_llm, "llm_provider", "LLM_PROVIDER"),
        (build_embedder, "embedding_provider", "EMBEDDING_PROVIDER"),
    ],
)
def test_unknown_provider_name_is_refused_naming_the_setting(
    build, field: str, setting: str
) -> None:
    with pytest.raises(ValueError, match=setting):
        build(config(**{field: "anthropic"}))


def test_concurrent_embed_calls_share_one_provider_call_within_the_window() -> None:
    import threading

    from memories.providers.batching import BatchingEmbedder

    calls: list[list[str]] = []

    class Recording:
        dimensions = 8

        def embed(self, texts: list[str]) -> list[list[float]]:
            calls.append(list(texts))
            return HashingEmbedder(8).embed(texts)

    batching = BatchingEmbedder(Recording(), window_seconds=0.2)
    results: dict[int, list[list[float]]] = {}
    barrier = threading.Barrier(4)

    def job(n: int) -> None:
        barrier.wait()
        results[n] = batching.embed([f"job {n} fact a", f"job {n} fact b"])

    threads = [threading.Thread(target=job, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and len(calls[0]) == 8
    for n in range(4):  # each caller gets its own vectors back, in order
        assert results[n] == HashingEmbedder(8).embed([f"job {n} fact a", f"job {n} fact b"])
