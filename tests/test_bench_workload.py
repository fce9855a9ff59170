"""The workload of bench/job_throughput.py is what its figures claim: every job a distinct
conversation of first-person statements the extractor turns into 1 to 3 facts, and a user's later
jobs meet what the earlier ones stored, so the decider answers ADD, UPDATE, NONE and DELETE (played
here against an in-memory store with the same rules the fake model answers with)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from memories.providers.base import ExistingMemory
from memories.providers.offline import RuleBasedLLM

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def job_throughput() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("job_throughput", BENCH / "job_throughput.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["job_throughput"] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_every_job_states_one_to_three_facts(job_throughput: ModuleType) -> None:
    llm = RuleBasedLLM()
    jobs = job_throughput.workload("test", 100, 3)
    counts = Counter(len(llm.extract_facts(messages)) for _, messages in jobs)
    assert set(counts) == {1, 2, 3}
    assert len(jobs) == 300


def test_no_user_sends_the_same_job_twice(job_throughput: ModuleType) -> None:
    # The service answers a repeated body for the same user with 409, not a job.
    jobs = job_throughput.workload("test", 100, 4)
    per_user = Counter((user, repr(messages)) for user, messages in jobs)
    assert max(per_user.values()) == 1
    texts = {repr(messages) for _, messages in jobs}
    assert len(texts) > 0.95 * len(jobs)  # and users hardly ever say the very same thing


def test_the_workload_is_seeded(job_throughput: ModuleType) -> None:
    assert job_throughput.workload("a", 20, 2) == job_throughput.workload("a", 20, 2)
    assert job_throughput.workload("a", 20, 2) != job_throughput.workload("b", 20, 2)


def test_later_jobs_make_the_decider_add_update_keep_and_close(job_throughput: ModuleType) -> None:
    llm = RuleBasedLLM()
    stores: dict[int, dict[int, str]] = {}
    events: Counter[str] = Counter()
    ids = iter(range(1, 10**6))
    for user, messages in job_throughput.workload("test", 100, 3):
        store = stores.setdefault(user, {})
        keys = list(store)
        shown = [ExistingMemory(id=n, text=store[key]) for n, key in enumerate(keys, start=1)]
        for decision in llm.decide(llm.extract_facts(messages), shown):
            events[decision.event] += 1
            if decision.event == "ADD":
                store[next(ids)] = decision.text
            elif decision.event == "UPDATE":
                store[keys[decision.memory_id - 1]] = decision.text
            elif decision.event == "DELETE":
                del store[keys[decision.memory_id - 1]]
    total = sum(events.values())
    assert events["ADD"] / total > 0.5
    assert events["UPDATE"] / total > 0.05
    assert events["NONE"] / total > 0.05
    assert events["DELETE"] > 0
