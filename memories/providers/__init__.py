"""Model providers behind two small contracts, and factories that pick one from plain config."""

from __future__ import annotations

from dataclasses import dataclass

from memories.providers.base import (
    Decision,
    Embedder,
    ExistingMemory,
    LLMProvider,
    MemoryEvent,
    ProviderError,
)
from memories.providers.offline import HashingEmbedder, RuleBasedLLM

__all__ = [
    "Decision",
    "Embedder",
    "ExistingMemory",
    "HashingEmbedder",
    "LLMProvider",
    "MemoryEvent",
    "ProviderConfig",
    "ProviderError",
    "RuleBasedLLM",
    "build_embedder",
    "build_llm",
]


@dataclass(frozen=True)
class ProviderConfig:
    """The settings the providers need, as plain values (the caller reads them from Django)."""

    llm_provider: str
    embedding_provider: str
    openai_api_key: str
    openai_base_url: str
    llm_model: str
    embedding_model: str
    embedding_dimensions: int
    embedding_send_dimensions: bool
    request_timeout: float
    client_max_retries: int
    # Calls in flight at once from one process, per endpoint (memories.providers.throttle).
    llm_max_concurrency: int = 64
    embedding_max_concurrency: int = 64


def build_llm(config: ProviderConfig) -> LLMProvider:
    """The LLM named by `llm_provider`: "openai" or "offline"."""
    if config.llm_provider == "offline":
        return RuleBasedLLM()
    if config.llm_provider == "openai":
        # Imported here: the openai package takes most of a second to import, offline needs none.
        from memories.providers.openai_provider import OpenAILLM

        return OpenAILLM(
            api_key=config.openai_api_key,
            base_url=config.openai_base_url,
            model=config.llm_model,
            timeout=config.request_timeout,
            max_retries=config.client_max_retries,
            max_concurrency=config.llm_max_concurrency,
        )
    raise ValueError(f"LLM_PROVIDER must be 'openai' or 'offline', not {config.llm_provider!r}")


def build_embedder(config: ProviderConfig) -> Embedder:
    """The embedder named by `embedding_provider`: "openai", "offline" or "local"."""
    if config.embedding_provider == "offline":
        return HashingEmbedder(config.embedding_dimensions)
    if config.embedding_provider == "local":
        # Imported here: it needs the `[local]` extra, and loading the model takes seconds.
        from memories.providers.local import LocalEmbedder

        return LocalEmbedder(dimensions=config.embedding_dimensions)
    if config.embedding_provider == "openai":
        from memories.providers.openai_provider import OpenAIEmbedder

        return OpenAIEmbedder(
            api_key=config.openai_api_key,
            base_url=config.openai_base_url,
            model=config.embedding_model,
            dimensions=config.embedding_dimensions,
            send_dimensions=config.embedding_send_dimensions,
            timeout=config.request_timeout,
            max_retries=config.client_max_retries,
            max_concurrency=config.embedding_max_concurrency,
        )
    raise ValueError(
        "EMBEDDING_PROVIDER must be 'openai', 'offline' or 'local', "
        f"not {config.embedding_provider!r}"
    )
