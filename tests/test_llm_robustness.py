"""The LLM path with servers that do not answer as asked: every bad shape a local model produces,
read when its meaning is clear, repaired once when it is not, a failed job with the reason after
that; transient errors retried, refusals not. All through the real openai client and the fake
server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from memories.models import Memory, MemoryRequest, OutboxEvent
from memories.pipeline import memory_request_run
from memories.providers.base import Decision, ExistingMemory, ProviderError, ProviderRejected
from memories.providers.openai_provider import DECIDE_PROMPT, EXTRACT_PROMPT, OpenAILLM
from tests.fake_openai import FakeOpenAI, FakeResponse, error_body, rule_based_chat
from tests.helpers import store_memories, submit_job

PARIS = [ExistingMemory(1, "Likes tea"), ExistingMemory(2, "Lives in Paris")]


def said(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text} for text in texts]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dimensions=16) as server:
        yield server


def llm_for(fake: FakeOpenAI, *, max_retries: int = 0, timeout: float = 5) -> OpenAILLM:
    return OpenAILLM(
        api_key="k",
        base_url=fake.base_url,
        model="local-llm",
        timeout=timeout,
        max_retries=max_retries,
    )


@pytest.fixture
def llm(fake: FakeOpenAI) -> OpenAILLM:
    return llm_for(fake)


def chat_calls(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path.endswith("/chat/completions")]


# --- Shapes that are read as they are: one call, no repair ---------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        '```json\n{"facts": ["Lives in Paris", "Likes hiking"]}\n```',
        '```\n{"facts": ["Lives in Paris", "Likes hiking"]}\n```',
        'Here is the JSON you asked for:\n\n```json\n{"facts": ["Lives in Paris", "Likes hiking"]}'
        "\n```\nLet me know if you need anything else!",
    ],
    ids=["json-fence", "bare-fence", "fence-in-prose"],
)
def test_json_in_code_fences_is_read(fake: FakeOpenAI, llm: OpenAILLM, answer: str) -> None:
    fake.answer_next(answer)
    assert llm.extract_facts(said("I live in Paris. I like hiking.")) == [
        "Lives in Paris",
        "Likes hiking",
    ]
    assert len(chat_calls(fake)) == 1


def test_json_surrounded_by_prose_is_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(
        'Sure! Based on the conversation [2 messages], the facts are {"facts": ["Lives in '
        'Paris"]}. I hope this helps {happy to help}.'
    )
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert len(chat_calls(fake)) == 1


def test_a_reasoning_models_thinking_is_skipped(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(
        '<think>The user says {"city": "Paris"}; so facts: [Lives in Paris].</think>\n'
        '{"facts": ["Lives in Paris"]}'
    )
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]


def test_python_style_json_from_a_small_model_is_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next("{'facts': ['Lives in Paris', 'Likes tea',],}")
    assert llm.extract_facts(said("I live in Paris and like tea")) == [
        "Lives in Paris",
        "Likes tea",
    ]


@pytest.mark.parametrize(
    "answer",
    [
        {"memories": ["Lives in Paris"]},
        {"items": ["Lives in Paris"]},
        {"results": [{"fact": "Lives in Paris"}]},
        {"user_facts": [{"text": "Lives in Paris"}]},
        {"response": {"facts": [{"content": "Lives in Paris"}]}},
    ],
    ids=["memories", "items", "results-of-objects", "only-list", "nested"],
)
def test_renamed_fact_keys_are_read(fake: FakeOpenAI, llm: OpenAILLM, answer: dict) -> None:
    fake.answer_next(answer)
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert len(chat_calls(fake)) == 1


def test_renamed_decision_keys_are_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(
        {
            "decisions": [
                {"action": "UPDATE", "memory_id": 2, "content": "Lives in Berlin"},
                {"operation": "ADD", "memory": "Likes hiking"},
                {"event": "NONE", "id": 1, "fact": "Likes tea"},
            ]
        }
    )
    decisions = llm.decide(["Lives in Berlin", "Likes hiking", "Likes tea"], PARIS)
    assert decisions == [
        Decision("UPDATE", text="Lives in Berlin", memory_id=2),
        Decision("ADD", text="Likes hiking"),
        Decision("NONE", text="Likes tea", memory_id=1),
    ]
    assert len(chat_calls(fake)) == 1


def test_a_bare_list_where_an_object_was_expected_is_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(["Lives in Berlin"], [{"event": "UPDATE", "id": 2, "text": "Lives in Berlin"}])
    facts = llm.extract_facts(said("I moved to Berlin"))
    assert facts == ["Lives in Berlin"]
    assert llm.decide(facts, PARIS) == [Decision("UPDATE", text="Lives in Berlin", memory_id=2)]
    assert len(chat_calls(fake)) == 2


def test_a_single_decision_not_wrapped_in_a_list_is_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next({"event": "DELETE", "id": 2})
    assert llm.decide(["No longer lives in Paris"], PARIS) == [Decision("DELETE", memory_id=2)]


def test_events_and_keys_in_another_case_are_read(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(
        {
            "Memory": [
                {"Event": "add", "Text": "Likes hiking"},
                {"EVENT": "Update", "ID": 2, "TEXT": "Lives in Berlin"},
                {"event": "delete", "id": 1},
                {"event": "None", "id": 1},
                {"event": "no-op"},
            ]
        }
    )
    decisions = llm.decide(["Likes hiking", "Lives in Berlin", "Dislikes tea"], PARIS)
    assert decisions == [
        Decision("ADD", text="Likes hiking"),
        Decision("UPDATE", text="Lives in Berlin", memory_id=2),
        Decision("DELETE", memory_id=1),
        Decision("NONE", memory_id=1),
        Decision("NONE"),
    ]


def test_ids_written_as_strings_are_read_as_integers(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    fake.answer_next(
        {
            "memory": [
                {"event": "UPDATE", "id": "2", "text": "Lives in Berlin"},
                {"event": "DELETE", "id": "#1"},
                {"event": "NONE", "id": " # 2 "},
            ]
        }
    )
    decisions = llm.decide(["Lives in Berlin", "Dislikes tea"], PARIS)
    assert [d.memory_id for d in decisions] == [2, 1, 2]


@pytest.mark.parametrize(
    "written", ["memory 2", "2a", "two", "9f1c2d3e-0000-4000-8000-000000000002", True, [2]]
)
def test_an_id_that_is_not_an_integer_is_never_guessed(
    fake: FakeOpenAI, llm: OpenAILLM, written: object
) -> None:
    fake.answer_next({"memory": [{"event": "DELETE", "id": written}]}, {"memory": []})
    # Not read as id 2: the model is asked again, and its second answer is taken.
    assert llm.decide(["No longer lives in Paris"], PARIS) == []
    repair = chat_calls(fake)[1]["messages"][-1]["content"]
    assert "DELETE needs the" in repair


def test_an_honest_empty_answer_is_a_success_with_nothing_to_do(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    fake.answer_next({"facts": []}, "[]")
    assert llm.extract_facts(said("Hello there")) == []
    assert llm.extract_facts(said("Hello again")) == []
    assert len(chat_calls(fake)) == 2  # no repair asked for either


# --- A server that refuses JSON mode itself ------------------------------------------------------


def test_a_server_that_refuses_response_format_is_asked_without_it(fake: FakeOpenAI) -> None:
    def no_json_mode(body: dict) -> Any:
        if "response_format" in body:  # as LM Studio answers {"type": "json_object"}
            message = "'response_format.type' must be 'json_schema' or 'text'"
            return FakeResponse(400, error_body(message, "invalid_request_error"))
        return "```json\n" + rule_based_chat(body) + "\n```"

    fake.chat_handler = no_json_mode
    llm = llm_for(fake)
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert llm.extract_facts(said("I like tea")) == ["Likes tea"]
    asked = ["response_format" in body for body in chat_calls(fake)]
    assert asked == [True, False, False]  # refused once, then never sent again


def test_a_400_about_something_else_is_not_taken_for_a_json_mode_refusal(
    fake: FakeOpenAI,
) -> None:
    fake.chat_handler = lambda body: FakeResponse(
        400, error_body("This model's maximum context length is 8192 tokens")
    )
    with pytest.raises(ProviderRejected, match="HTTP 400"):
        llm_for(fake, max_retries=2).extract_facts(said("I live in Paris"))
    assert len(fake.requests) == 1


# --- One repair round ----------------------------------------------------------------------------


def test_an_unreadable_answer_is_repaired_once_showing_the_model_its_answer_and_the_error(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    garbage = "The user lives in Paris and likes hiking."
    fake.answer_next(garbage, '{"facts": ["Lives in Paris", "Likes hiking"]}')
    assert llm.extract_facts(said("I live in Paris. I like hiking.")) == [
        "Lives in Paris",
        "Likes hiking",
    ]
    first, repair = chat_calls(fake)
    assert repair["messages"][:2] == first["messages"]
    assert repair["messages"][2] == {"role": "assistant", "content": garbage}
    follow_up = repair["messages"][3]
    assert follow_up["role"] == "user"
    assert "could not be used: the answer holds no JSON object" in follow_up["content"]
    assert "JSON object" in follow_up["content"] and repair["response_format"] == {
        "type": "json_object"
    }


def test_an_answer_that_fails_validation_is_repaired_with_the_validation_error(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    fake.answer_next(
        {"memory": [{"event": "MERGE", "id": 2, "text": "Lives in Berlin"}]},
        {"memory": [{"event": "UPDATE", "id": 2, "text": "Lives in Berlin"}]},
    )
    decisions = llm.decide(["Lives in Berlin"], PARIS)
    assert decisions == [Decision("UPDATE", text="Lives in Berlin", memory_id=2)]
    follow_up = chat_calls(fake)[1]["messages"][-1]["content"]
    assert "memory.0.event" in follow_up and "'MERGE'" in follow_up


def test_the_default_fake_model_answers_a_repair_round_too(
    fake: FakeOpenAI, llm: OpenAILLM
) -> None:
    fake.answer_next("")  # an empty answer first; the rule-based model answers the repair
    assert llm.extract_facts(said("I live in Oslo")) == ["Lives in Oslo"]
    assert "the answer was empty" in chat_calls(fake)[1]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["Lives in Paris", "I said: Lives in Paris"], "the answer holds no JSON object"),
        (["", ""], "the answer was empty"),
        (['{"facts": [1, 2]}', '{"facts": [1, 2]}'], "facts.0: Input should be a valid string"),
        (['{"answer": 42}', '{"answer": 42}'], 'the answer has no "facts" list'),
    ],
    ids=["prose", "empty", "not-text", "no-list"],
)
def test_an_answer_unreadable_twice_is_a_provider_error_with_the_reason(
    fake: FakeOpenAI, llm: OpenAILLM, answers: list[str], reason: str
) -> None:
    fake.answer_next(*answers)
    with pytest.raises(ProviderError) as raised:
        llm.extract_facts(said("I live in Paris"))
    message = str(raised.value)
    assert "local-llm" in message and "even when asked again" in message and reason in message
    assert raised.value.retryable  # a model may answer better on the job's next attempt
    assert len(chat_calls(fake)) == 2  # one repair round, not more


def test_an_answer_cut_off_at_the_length_limit_says_so(fake: FakeOpenAI, llm: OpenAILLM) -> None:
    def truncated(body: dict) -> Any:
        return FakeResponse(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": '{"facts": ["Lives in'},
                        "finish_reason": "length",
                    }
                ],
            },
        )

    fake.chat_handler = truncated
    with pytest.raises(ProviderError, match="cut off at the length limit"):
        llm.extract_facts(said("I live in Paris"))


# --- Transient errors retry, refusals do not -----------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_refused_request_fails_at_once_without_retry(fake: FakeOpenAI, status: int) -> None:
    fake.fail_next(1, status=status)
    llm = llm_for(fake, max_retries=3)
    with pytest.raises(ProviderRejected, match=f"HTTP {status}") as raised:
        llm.extract_facts(said("I live in Paris"))
    assert not raised.value.retryable
    assert len(fake.requests) == 1
    assert "scripted failure" not in str(raised.value)  # our words, not the server's


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_transient_error_is_retried_then_succeeds(fake: FakeOpenAI, status: int) -> None:
    fake.fail_next(1, status=status, headers={"retry-after-ms": "20"})
    assert llm_for(fake, max_retries=2).extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert len(fake.requests) == 2


def test_a_server_error_is_retried_with_backoff_when_no_delay_is_given(fake: FakeOpenAI) -> None:
    fake.fail_next(1, status=500)
    started = time.monotonic()
    assert llm_for(fake, max_retries=1).extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert time.monotonic() - started >= 0.3  # the client's backoff: 0.5 s less up to 25% jitter


def test_a_timeout_is_retried_then_succeeds(fake: FakeOpenAI) -> None:
    calls: list[int] = []

    def slow_first(body: dict) -> Any:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return rule_based_chat(body)

    fake.chat_handler = slow_first
    llm = llm_for(fake, max_retries=1, timeout=0.3)
    assert llm.extract_facts(said("I live in Paris")) == ["Lives in Paris"]
    assert len(calls) == 2


def test_transient_errors_that_outlast_the_client_retries_stay_retryable(fake: FakeOpenAI) -> None:
    fake.fail_next(2, status=503, headers={"retry-after-ms": "20"})
    with pytest.raises(ProviderError) as raised:
        llm_for(fake, max_retries=1).extract_facts(said("I live in Paris"))
    assert raised.value.retryable and not isinstance(raised.value, ProviderRejected)
    assert "HTTP 503" in str(raised.value)


# --- Through a real memory job -------------------------------------------------------------------


def extraction_then(decide: Any) -> Any:
    """A chat handler: the rule-based extraction, then `decide(shown)` for the decide prompt."""

    def chat(body: dict) -> Any:
        if body["messages"][0]["content"] == EXTRACT_PROMPT:
            return rule_based_chat(body)
        assert body["messages"][0]["content"] == DECIDE_PROMPT
        payload = json.loads(body["messages"][1]["content"])
        return decide({m["text"]: m["id"] for m in payload["memories"]})

    return chat


@pytest.mark.django_db
def test_a_job_whose_answer_is_unreadable_twice_fails_with_the_reason_not_an_empty_success(
    settings, api, end_user, openai_settings
) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 2
    openai_settings.chat_handler = lambda body: "I could not find any JSON to give you, sorry."
    response = api.post(
        "/v1/memories",
        {"user_id": str(end_user.id), "messages": said("I live in Paris.")},
        format="json",
    )
    assert response.status_code == 202, response.content
    request_id = response.json()["request_id"]
    outcomes = [memory_request_run(request_id=request_id) for _ in range(2)]
    assert outcomes == ["retry", "failed"]
    status = api.get(f"/v1/requests/{request_id}").json()
    assert status["status"] == "failure"
    assert "no usable answer, even when asked again" in status["error"]
    assert "the answer holds no JSON object" in status["error"]
    assert "sorry" not in status["error"]  # what the model said stays in the log
    assert not status.get("events")
    assert not Memory.objects.exists()
    assert not OutboxEvent.objects.filter(event_type__startswith="memory.").exists()
    assert len(chat_calls(openai_settings)) == 4  # two attempts, each with its repair round


@pytest.mark.django_db
def test_a_job_whose_model_refuses_the_request_fails_at_once(
    settings, end_user, openai_settings
) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 3
    openai_settings.fail_next(1, status=400)
    request = submit_job(end_user, "I live in Paris.")
    assert memory_request_run(request_id=str(request.id)) == "failed"
    request.refresh_from_db()
    assert request.status == MemoryRequest.Status.FAILURE and request.attempts == 1
    assert "not retried" in request.error and "HTTP 400" in request.error
    assert len(openai_settings.requests) == 1
    assert not Memory.objects.exists()


@pytest.mark.django_db
def test_a_job_whose_model_is_briefly_unavailable_is_retried(
    settings, end_user, openai_settings
) -> None:
    settings.MEMORY_JOB_MAX_ATTEMPTS = 3
    openai_settings.fail_next(1, status=429)
    request = submit_job(end_user, "I live in Paris.")
    assert memory_request_run(request_id=str(request.id)) == "retry"
    assert memory_request_run(request_id=str(request.id)) == "done"
    assert list(Memory.objects.values_list("content", flat=True)) == ["Lives in Paris"]


@pytest.mark.django_db
def test_a_job_reads_a_fenced_renamed_answer_and_applies_it(end_user, openai_settings) -> None:
    (paris,) = store_memories(end_user, "Lives in Paris")

    def decide(shown: dict[str, int]) -> str:
        body = {"Decisions": [{"Action": "update", "memory_id": f"#{shown['Lives in Paris']}",
                               "content": "Lives in Berlin"}]}  # fmt: skip
        return f"Here you go:\n```json\n{json.dumps(body)}\n```"

    openai_settings.chat_handler = extraction_then(decide)
    request = submit_job(end_user, "I moved to Berlin.")
    assert memory_request_run(request_id=str(request.id)) == "done"
    paris.refresh_from_db()
    assert paris.content == "Lives in Berlin" and paris.version == 2


@pytest.mark.django_db
def test_an_id_the_model_invented_is_never_applied(end_user, openai_settings) -> None:
    paris, tea = store_memories(end_user, "Lives in Paris", "Likes tea")

    def decide(shown: dict[str, int]) -> dict:
        invented = max(shown.values()) + 5
        return {
            "memory": [
                {"event": "update", "id": f"#{shown['Lives in Paris']}", "text": "Lives in Rome"},
                {"event": "delete", "id": str(invented)},
                {"event": "update", "id": invented + 1, "text": "Likes coffee"},
            ]
        }

    openai_settings.chat_handler = extraction_then(decide)
    request = submit_job(end_user, "I moved to Rome.")
    assert memory_request_run(request_id=str(request.id)) == "done"
    request.refresh_from_db()
    assert [(e["event"], e["memory_id"]) for e in request.result] == [("UPDATE", str(paris.id))]
    tea.refresh_from_db()
    assert tea.content == "Likes tea" and tea.deleted_at is None and tea.version == 1
    assert sorted(
        Memory.objects.filter(deleted_at__isnull=True).values_list("content", flat=True)
    ) == ["Likes tea", "Lives in Rome"]
