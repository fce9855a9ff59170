"""Fixtures on real services: embedded (or given) PostgreSQL and Redis, real HTTP, real workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from memories import accounts
from memories.models import EndUser, Tenant
from memories.providers.wiring import get_embedder, get_llm
from tests.fake_openai import FakeOpenAI
from tests.workers import CeleryWorker, database_url_for


@pytest.fixture(scope="session", autouse=True)
def _empty_broker() -> None:
    # Each test process owns one Redis database (see settings); start it empty so no message
    # from an earlier run reaches this run's workers.
    redis.Redis.from_url(settings.REDIS_URL).flushdb()


@pytest.fixture(autouse=True)
def _fresh_providers() -> Iterator[None]:
    get_llm.cache_clear()
    get_embedder.cache_clear()
    yield
    get_llm.cache_clear()
    get_embedder.cache_clear()


@pytest.fixture
def tenant(db) -> Tenant:
    return accounts.tenant_get_or_create(name="acme")


@pytest.fixture
def other_tenant(db) -> Tenant:
    return accounts.tenant_get_or_create(name="globex")


def _client_for(tenant: Tenant) -> APIClient:
    _, raw_key = accounts.api_key_create(tenant=tenant)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


@pytest.fixture
def api(tenant: Tenant) -> APIClient:
    return _client_for(tenant)


@pytest.fixture
def other_api(other_tenant: Tenant) -> APIClient:
    return _client_for(other_tenant)


@pytest.fixture
def end_user(tenant: Tenant) -> EndUser:
    return accounts.end_user_create(tenant=tenant, external_id="alice")


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dimensions=settings.EMBEDDING_DIMENSIONS) as server:
        yield server


@pytest.fixture
def openai_settings(settings, fake_openai: FakeOpenAI) -> FakeOpenAI:
    """Route both model calls through the real `openai` client to the fake server."""
    settings.LLM_PROVIDER = "openai"
    settings.EMBEDDING_PROVIDER = "openai"
    settings.OPENAI_API_KEY = "test-key"
    settings.OPENAI_BASE_URL = fake_openai.base_url
    settings.LLM_CLIENT_MAX_RETRIES = 0
    get_llm.cache_clear()
    get_embedder.cache_clear()
    return fake_openai


@pytest.fixture
def worker_env(transactional_db) -> dict[str, str]:
    """Environment for a Celery worker process that shares this test's database and Redis."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "memoryproject.settings",
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "MEMORY_JOB_RETRY_BACKOFF_SECONDS": "0.1",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def start_worker(worker_env: dict[str, str]) -> Iterator:
    """Start real Celery worker processes; all are stopped when the test ends."""
    started: list[CeleryWorker] = []

    def start(
        *,
        queues: str = "high,default,batch",
        concurrency: int = 1,
        with_beat: bool = False,
        pool: str = "prefork",
        **overrides: str,
    ) -> CeleryWorker:
        worker = CeleryWorker(
            {**worker_env, **overrides},
            queues=queues,
            concurrency=concurrency,
            with_beat=with_beat,
            pool=pool,
        )
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()
