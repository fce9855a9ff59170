"""The published contract: `openapi.yaml` is what the code generates, and `/v1/schema/` with its
Swagger UI (`/v1/docs/`, assets served here) answer without a key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiYamlRenderer

from tests.live_server import uvicorn_live_server

REPO = Path(__file__).resolve().parent.parent


def test_committed_openapi_yaml_is_what_the_code_generates() -> None:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    generated = OpenApiYamlRenderer().render(schema, renderer_context={}).decode()
    committed = (REPO / "openapi.yaml").read_text()
    assert generated == committed, "openapi.yaml is stale: run `make openapi` and commit it"


def test_every_operation_documents_its_errors_with_the_shared_error_body() -> None:
    schema = yaml.safe_load((REPO / "openapi.yaml").read_text())
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert {"400", "401", "429"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if "{" in path:
                assert "404" in responses, (method, path)


def test_wait_parameters_are_capped_as_documented() -> None:
    schema = yaml.safe_load((REPO / "openapi.yaml").read_text())
    status_params = schema["paths"]["/v1/requests/{request_id}"]["get"]["parameters"]
    wait = next(p for p in status_params if p["name"] == "wait")
    assert wait["schema"]["maximum"] == 20
    job = schema["components"]["schemas"]["MemoryCollectionInputRequest"]
    assert job["properties"]["wait"]["maximum"] == 20


def test_the_stream_is_documented_and_marked_for_fuzzers_to_skip() -> None:
    schema = yaml.safe_load((REPO / "openapi.yaml").read_text())
    stream = schema["paths"]["/v1/stream"]["get"]
    assert stream["x-fuzz"] is False
    frame = stream["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert frame == {"$ref": "#/components/schemas/StreamFrame"}
    assert "Event" in schema["components"]["schemas"]


@pytest.mark.django_db(transaction=True)
def test_schema_and_swagger_ui_are_served_without_a_key() -> None:
    with uvicorn_live_server() as base_url:
        schema = httpx.get(f"{base_url}/v1/schema/?format=json")
        assert schema.status_code == 200, schema.text
        assert schema.json()["paths"]["/v1/memories"]["post"]["operationId"] == (
            "memory_job_submit"
        )
        docs = httpx.get(f"{base_url}/v1/docs/")
        assert docs.status_code == 200
        assert "swagger-ui" in docs.text
        # Swagger UI's files come from this server (drf-spectacular-sidecar), not a CDN.
        assert "cdn" not in docs.text.lower()
        asset = "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"
        assert asset in docs.text
        bundle = httpx.get(f"{base_url}{asset}")
        assert bundle.status_code == 200
        assert len(bundle.content) > 100_000
        # ...and the rest of /v1 still wants a key.
        assert httpx.get(f"{base_url}/v1/whoami").status_code == 401
