"""Which LLM and embedder this process uses: built once from the settings, shared by its threads.

The only module of `providers/` that reads Django settings; the rest take plain values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from django.conf import settings

from memories.providers import Embedder, LLMProvider, ProviderConfig, build_embedder, build_llm
from memories.providers.batching import BatchingEmbedder

T = TypeVar("T")


def provider_config() -> ProviderConfig:
    return ProviderConfig(
        llm_provider=settings.LLM_PROVIDER,
        embedding_provider=settings.EMBEDDING_PROVIDER,
        openai_api_key=settings.OPENAI_API_KEY,
        openai_base_url=settings.OPENAI_BASE_URL,
        llm_model=settings.LLM_MODEL,
        embedding_model=settings.EMBEDDING_MODEL,
        embedding_dimensions=settings.EMBEDDING_DIMENSIONS,
        embedding_send_dimensions=settings.EMBEDDING_SEND_DIMENSIONS,
        request_timeout=settings.LLM_REQUEST_TIMEOUT_SECONDS,
        client_max_retries=settings.LLM_CLIENT_MAX_RETRIES,
        llm_max_concurrency=settings.LLM_MAX_CONCURRENCY,
        embedding_max_concurrency=settings.EMBEDDING_MAX_CONCURRENCY,
    )


class _BuiltOnce(Generic[T]):
    """`functools.cache` for a builder without arguments, but built once only: the threads of a
    `threads` worker that ask at the same moment get the same provider, so they share its
    connections and its batching window (with `cache`, each first caller built its own)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._built: list[T] = []

    def __call__(self) -> T:
        if not self._built:
            with self._lock:
                if not self._built:
                    self._built.append(self._build())
        return self._built[0]

    def cache_clear(self) -> None:
        with self._lock:
            self._built.clear()


@_BuiltOnce
def get_llm() -> LLMProvider:
    return build_llm(provider_config())


@_BuiltOnce
def get_embedder() -> Embedder:
    embedder = build_embedder(provider_config())
    if settings.EMBEDDING_BATCH_WINDOW_MS > 0:
        # Jobs running side by side in one worker (thread pool) share embedding calls.
        embedder = BatchingEmbedder(
            embedder, window_seconds=settings.EMBEDDING_BATCH_WINDOW_MS / 1000
        )
    return embedder
