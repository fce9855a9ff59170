"""The API fuzzed against its published contract (`openapi.yaml`) with schemathesis, on a real
server (uvicorn, the test database, Redis, a Celery worker): no answer is a 5xx, and every answer's
status, content type and body are ones the contract documents. Bounded: a few examples per
operation, and the objects that path parameters name exist (a user, its memory, a finished job, a
session), so that the answers are not only 404s. The links of the contract (a new user -> its job
-> the job's status -> the memory it made) are walked by their operationIds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from memories import accounts
from tests.live_server import uvicorn_live_server

CONTRACT = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi.yaml").read_text())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 6
FUZZ_BUDGET_SECONDS = 45


def _not_for_fuzzers(ctx: Any) -> bool:
    """Operations a fuzzer may call: not those the contract marks `x-fuzz: false` (the stream)."""
    return ctx.operation.definition.raw.get("x-fuzz", True) is False


def _operation(operation_id: str) -> tuple[str, str, dict[str, Any]]:
    for path, item in CONTRACT["paths"].items():
        for method, operation in item.items():
            if operation.get("operationId") == operation_id:
                return method.upper(), path, operation
    raise AssertionError(f"no operation {operation_id}")


def _link(from_id: str, status: str, name: str) -> dict[str, Any]:
    return _operation(from_id)[2]["responses"][status]["links"][name]


def _pointer(body: Any, expression: str) -> Any:
    """A link's `$response.body#/a/0/b` read from a response body."""
    assert expression.startswith("$response.body#/"), expression
    for part in expression.removeprefix("$response.body#/").split("/"):
        body = body[int(part)] if isinstance(body, list) else body[part]
    return body


def _details(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", ())
    return "\n".join(f"  {type(e).__name__}: {e}" for e in inner) if inner else str(exc)


@pytest.fixture
def live_api(tenant, start_worker) -> Iterator[dict[str, Any]]:
    """A running server, a worker, an admin key, and one finished job's user, memory and request."""
    _, raw_key = accounts.api_key_create(tenant=tenant, name="fuzz")
    headers = {"Authorization": f"Bearer {raw_key}"}
    start_worker(queues="high,default,batch")
    with (
        uvicorn_live_server() as base_url,
        httpx.Client(base_url=base_url, headers=headers) as http,
    ):
        user_id = http.post("/v1/users", json={"external_id": "fuzz"}).json()["user_id"]
        job = http.post(
            "/v1/memories",
            json={
                "user_id": user_id,
                "messages": [{"role": "user", "content": "I live in Paris."}],
                "infer": False,
                "wait": 20,
            },
            timeout=30,
        )
        assert job.status_code in (200, 202), job.text
        request_id, deadline = job.json()["request_id"], time.monotonic() + 90
        while job.json()["status"] != "success" and time.monotonic() < deadline:
            # A loaded machine may take longer than one wait: keep waiting, without polling.
            job = http.get(f"/v1/requests/{request_id}", params={"wait": 20}, timeout=30)
        assert job.json()["status"] == "success", job.text
        session = http.post("/v1/sessions", json={"user_id": user_id}).json()
        yield {
            "base_url": base_url,
            "headers": headers,
            "http": http,
            "path": {
                "user_id": user_id,
                "request_id": job.json()["request_id"],
                "memory_id": job.json()["events"][0]["memory_id"],
                "session_id": session["session_id"],
            },
        }


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_fuzzed_calls_never_fail_with_5xx_and_answer_as_documented(live_api) -> None:
    schema = schemathesis.openapi.from_dict(CONTRACT).exclude(func=_not_for_fuzzers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 35
    assert "/v1/stream" not in {operation.path for operation in operations}
    # Deletions last: the objects the others' path parameters name are still there for them.
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
    failures: list[str] = []
    started = time.monotonic()
    for operation in operations:
        path_parameters = {
            name: value
            for name, value in live_api["path"].items()
            if "{" + name + "}" in operation.path
        }
        strategy = operation.as_strategy(path_parameters=path_parameters or None)

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=live_api["base_url"],
                headers=live_api["headers"],
                checks=CHECKS,
                timeout=30,
            )

        try:
            call()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's, not the first's
            failures.append(
                f"{operation.method.upper()} {operation.path}: {exc!r}\n{_details(exc)}"
            )
        assert time.monotonic() - started < FUZZ_BUDGET_SECONDS * 2, "the fuzz ran too long"
    assert not failures, "\n\n".join(failures)


@pytest.mark.django_db(transaction=True)
def test_links_lead_from_a_new_user_to_its_job_its_status_and_its_memory(live_api) -> None:
    http: httpx.Client = live_api["http"]

    def call(operation_id: str, path_values: dict[str, Any], **kwargs: Any) -> httpx.Response:
        method, path, _ = _operation(operation_id)
        return http.request(method, path.format(**path_values), timeout=30, **kwargs)

    user = call("user_create", {}, json={"external_id": "walker"})
    assert user.status_code == 201
    submit = _link("user_create", "201", "SubmitMemoryJob")
    assert submit["operationId"] == "memory_job_submit"
    body = {**submit["requestBody"], "user_id": _pointer(user.json(), "$response.body#/user_id")}
    job = call(submit["operationId"], {}, json=body)
    assert job.status_code in (200, 202), job.text

    to_status = _link("memory_job_submit", str(job.status_code), "GetRequestStatus")
    request_id = _pointer(job.json(), to_status["parameters"]["request_id"])
    status = call(to_status["operationId"], {"request_id": request_id}, params={"wait": 20})
    assert status.status_code == 200
    assert status.json()["status"] == "success", status.text

    to_memory = _link("request_status", "200", "GetMemory")
    memory_id = _pointer(status.json(), to_memory["parameters"]["memory_id"])
    memory = call(to_memory["operationId"], {"memory_id": memory_id})
    assert memory.status_code == 200
    assert memory.json()["content"] == "I live in Paris."
    assert memory.json()["user_id"] == user.json()["user_id"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_stateful_runs_follow_the_links_and_answer_as_documented(live_api) -> None:
    schema = schemathesis.openapi.from_dict(CONTRACT).exclude(func=_not_for_fuzzers)
    base_url, headers = live_api["base_url"], live_api["headers"]

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "headers": headers, "timeout": 30}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Machine.run(
        settings=settings(
            max_examples=10,
            stateful_step_count=4,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
