"""Settings as an operator meets them: importing them starts nothing, and a wrong value stops the
process with one line naming the variable and what it may be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers import BASE_DIR

_SERVICE_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "MEMORY_TEST_REDIS",
    "PYTEST_XDIST_WORKER",
    "SECRET_KEY",
    "REQUIRE_SECRET_KEY",
)

_URLS = {"DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "REDIS_URL": "redis://127.0.0.1:1/0"}


def _clean_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    env |= {"DJANGO_SETTINGS_MODULE": "memoryproject.settings", "MEMORY_VAR_DIR": str(tmp_path)}
    return env | overrides


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_importing_the_settings_without_urls_fails_in_one_line_and_starts_no_server(
    tmp_path,
) -> None:
    env = _clean_env(tmp_path, SECRET_KEY="k" * 50)
    done = _run([sys.executable, "-c", "import memoryproject.settings"], env)
    assert done.returncode != 0
    assert "DATABASE_URL is not set" in done.stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # no embedded PostgreSQL nor Redis was started


def test_a_process_given_both_urls_never_touches_the_embedded_servers(tmp_path) -> None:
    env = _clean_env(tmp_path, SECRET_KEY="k" * 50, **_URLS)
    code = (
        "import django; django.setup(); from django.conf import settings; print(settings.REDIS_URL)"
    )
    done = _run([sys.executable, "-c", code], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "redis://127.0.0.1:1/0"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("LLM_PROVIDER", "gpt", "openai, offline"),
        ("EMBEDDING_PROVIDER", "cohere", "openai, offline, local"),
        ("LOG_FORMAT", "xml", "json, plain"),
    ],
)
def test_a_wrong_choice_stops_manage_py_with_one_line_naming_it(
    tmp_path, variable: str, value: str, allowed: str
) -> None:
    env = _clean_env(
        tmp_path,
        DATABASE_URL="postgresql://u@127.0.0.1:1/x",
        REDIS_URL="redis://127.0.0.1:1/0",
        **{variable: value},
    )
    done = _run([sys.executable, "manage.py", "check"], env)
    message = f"manage.py: {variable} must be one of {allowed}; got {value!r}"
    assert (done.returncode, done.stderr.strip()) == (2, message)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "WORKER_POOL",
            "gevent",
            "WORKER_POOL must be one of prefork, threads, solo; got 'gevent'",
        ),
        (
            "WORKER_CONCURRENCY",
            "0",
            "WORKER_CONCURRENCY must be a whole number from 1 to 10000; got '0'",
        ),
        (
            "BATCH_WORKER_CONCURRENCY",
            "many",
            "BATCH_WORKER_CONCURRENCY must be a whole number from 1 to 10000; got 'many'",
        ),
    ],
)
def test_a_wrong_worker_setting_stops_make_run_and_the_image_before_anything_starts(
    tmp_path, variable: str, value: str, message: str
) -> None:
    env = _clean_env(tmp_path, **{variable: value})
    done = _run([sys.executable, "-m", "memoryproject.run"], env)
    assert (done.returncode, done.stderr.strip()) == (2, f"make run: {message}")
    assert list(tmp_path.iterdir()) == []  # refused before the embedded servers started
    # The image runs one worker per lane, each reading its lane's settings as `make run` does.
    lane = "batch" if variable.startswith("BATCH_") else "default"
    image = _run(["sh", str(BASE_DIR / "docker" / "entrypoint.sh"), "worker", lane], env)
    assert (image.returncode, image.stderr.strip()) == (2, f"entrypoint: {message}")


_PRINT_KEY = [
    sys.executable,
    "-c",
    "import os, runpy, sys; sys.argv = ['manage.py', 'shell', '-c', "
    "'from django.conf import settings; print(settings.SECRET_KEY)']; "
    "runpy.run_path('manage.py', run_name='__main__')",
]


def test_without_a_secret_key_development_generates_one_once_and_keeps_it(tmp_path) -> None:
    first = _run(_PRINT_KEY, _clean_env(tmp_path, **_URLS))
    second = _run(_PRINT_KEY, _clean_env(tmp_path, **_URLS))
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip().splitlines()[-1]
    assert len(key) >= 50 and second.stdout.strip().splitlines()[-1] == key
    kept = tmp_path / "secret_key"
    assert kept.read_text().strip() == key and oct(kept.stat().st_mode & 0o777) == "0o600"
    assert "dev-only" not in (BASE_DIR / "memoryproject" / "settings.py").read_text()


def test_with_require_secret_key_nothing_is_made_up_and_the_start_refused(tmp_path) -> None:
    done = _run(_PRINT_KEY, _clean_env(tmp_path, REQUIRE_SECRET_KEY="true", **_URLS))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("manage.py: SECRET_KEY is not set")
    assert not (tmp_path / "secret_key").exists()


def test_the_compose_file_takes_every_credential_from_its_env_file() -> None:
    compose = (BASE_DIR / "docker" / "compose.yaml").read_text()
    for credential in ("POSTGRES_PASSWORD", "SECRET_KEY", "POSTGRES_USER"):
        assert f"${{{credential}:?" in compose  # required from docker/.env, no default
    assert "change-me" not in compose and "memory:memory@" not in compose
    assert 'REQUIRE_SECRET_KEY: "true"' in compose
    example = dict(
        line.split("=", 1)
        for line in (BASE_DIR / "docker" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["SECRET_KEY"] == "" and example["POSTGRES_PASSWORD"] == ""
    assert "REQUIRE_SECRET_KEY=true" in (BASE_DIR / "docker" / "Dockerfile").read_text()


def test_behind_pgbouncer_server_side_cursors_can_be_switched_off(tmp_path) -> None:
    probe = [
        sys.executable,
        "-c",
        "from django.conf import settings; "
        "print(settings.DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'])",
    ]
    default = _run(probe, _clean_env(tmp_path, SECRET_KEY="k", **_URLS))
    assert default.stdout.strip() == "False", default.stderr
    env = _clean_env(tmp_path, SECRET_KEY="k", DB_DISABLE_SERVER_SIDE_CURSORS="true", **_URLS)
    assert _run(probe, env).stdout.strip() == "True"
