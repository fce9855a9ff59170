"""The production files in docker/, checked where no Docker engine runs: compose.yaml against the
Compose Specification's JSON schema (vendored: docker/compose-spec.schema.json), every service's
command run through the real entrypoint with its programs replaced by recorders and each recorded
command checked against the code (a module to serve, a manage.py command, the Celery app and its
lanes), every variable the containers are given or .env.example lists read by the code (and every
setting listed, at its default), and the alert rules naming only metrics the service exports.

The schema is the one docker-compose 1.29.2 ships (compose/config/compose_spec.json in its wheel,
Apache-2.0), kept in the repository so that the test needs no network.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SETTINGS = ROOT / "memoryproject" / "settings.py"
# Settings whose default the code decides when they are unset (listed empty in .env.example).
DEFAULT_DECIDED_BY_CODE = {"SEARCH_VECTOR_WEIGHT": "0.25 or 0.5, by the embedder"}
# Series Prometheus makes itself, which an alert may name beside the service's own.
PROMETHEUS_SERIES = {"up"}


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def app_services() -> dict[str, dict[str, Any]]:
    """The services that run the project's image (built from docker/Dockerfile)."""
    return {name: s for name, s in compose_file()["services"].items() if "build" in s}


# --- What the code reads -----------------------------------------------------------------------


def _constant(node: ast.expr) -> Any:
    """The value of a default written as a constant expression (`24 * 3600`), else None."""
    allowed = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.List, ast.operator, ast.unaryop)
    if not all(isinstance(n, allowed + (ast.expr_context,)) for n in ast.walk(node)):
        return None
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})


def settings_reads() -> dict[str, Any]:
    """Every variable memoryproject/settings.py reads (through its env_* helpers or os.environ),
    with its default when that is a constant (None otherwise)."""
    reads: dict[str, Any] = {}
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = node.args[0]
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id.startswith("env_"):
            default = _constant(node.args[1]) if len(node.args) > 1 else None
            if func.id != "env_required":
                reads[name.value] = default
            else:
                reads.setdefault(name.value, None)
        elif isinstance(func, ast.Attribute) and ast.unparse(func) == "os.environ.get":
            reads.setdefault(name.value, None)
    return reads


def code_reads() -> set[str]:
    """Every variable a process of the image reads: the settings, the other modules'
    `environ.get("X")` / `environ["X"]`, and the entrypoint's `$X`."""
    names = set(settings_reads())
    read = re.compile(r"environ(?:\.get\(|\[)\s*[\"']([A-Z][A-Z0-9_]*)[\"']")
    for package in ("memoryproject", "memories", "tasks", "webhooks"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(read.findall(path.read_text()))
    names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", ENTRYPOINT.read_text()))
    return names


def compose_variables() -> dict[str, str | None]:
    """The variables compose.yaml interpolates (`${X}`, `${X:-default}`, `${X:?message}`), with
    their default; `$${X}` is the container's own shell variable, not compose's."""
    found: dict[str, str | None] = {}
    pattern = r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}"
    for name, operator, value in re.findall(pattern, COMPOSE.read_text()):
        found[name] = value if operator == ":-" else found.get(name)
    return found


def entrypoint_defaults() -> dict[str, str]:
    return dict(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}", ENTRYPOINT.read_text()))


def env_example() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line of .env.example, commented out or not."""
    lines = re.findall(r"^(?:#\s?)?([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    names = [name for name, _ in lines]
    assert len(names) == len(set(names)), "a variable is listed twice in .env.example"
    return dict(lines)


def same_value(text: str, default: Any) -> bool:
    if isinstance(default, bool):
        return text.lower() in (
            {"1", "true", "yes", "on"} if default else {"0", "false", "no", "off"}
        )
    if isinstance(default, int | float):
        return float(text) == float(default)
    if isinstance(default, list):
        return [item.strip() for item in text.split(",") if item.strip()] == [
            str(item) for item in default
        ]
    return text == default


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    # The schema declares draft 2019-09.
    validator = jsonschema.Draft201909Validator(schema)
    compose = compose_file()
    assert [error.message for error in validator.iter_errors(compose)] == []
    # The schema catches what compose would refuse: a misspelt key, a wrong type.
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["helthcheck"] = broken["services"]["web"].pop("healthcheck")
    broken["services"]["redis"]["ports"] = "6379:6379"
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_runs_postgres_18_with_pgvector_and_redis_with_aof_all_health_checked() -> None:
    services = compose_file()["services"]
    assert re.fullmatch(r"pgvector/pgvector:[0-9.]+-pg18(-\w+)?", services["postgres"]["image"])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][-1]
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["command"][redis["command"].index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    probe = " ".join(services["web"]["healthcheck"]["test"])
    assert "/readyz" in probe
    from django.urls import resolve

    assert resolve("/readyz").url_name == "readyz"
    for name, service in app_services().items():
        assert service["env_file"] == ".env", name
        for needed in ("postgres", "redis"):
            assert service["depends_on"][needed] == {"condition": "service_healthy"}, name


def _recorders(folder: Path, log: Path) -> str:
    """A PATH on which python, uvicorn and celery only record how they were called."""
    folder.mkdir()
    for program in ("python", "uvicorn", "celery"):
        recorder = folder / program
        recorder.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"with open({str(log)!r}, 'a') as log:\n"
            "    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        )
        recorder.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def run_entrypoint(
    tmp_path: Path, command: list[str], environment: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    recorders = tmp_path / "bin"
    path = _recorders(recorders, log) if not recorders.exists() else f"{recorders}:/usr/bin:/bin"
    env = {**environment, "PATH": path, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), *command], env=env, capture_output=True, text=True, timeout=30
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose gives it, with placeholder values for .env's."""
    given = {"POSTGRES_USER": "memory", "POSTGRES_PASSWORD": "secret", "SECRET_KEY": "k"}

    def interpolate(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            name, operator, default = match.groups()
            return given.get(name, default if operator == ":-" else "")

        return re.sub(r"\$\{([A-Z][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)

    return {name: interpolate(str(value)) for name, value in service["environment"].items()}


def check_command(call: list[str]) -> str:
    """What the recorded command runs, after checking it names something the code has."""
    from celery import Celery
    from django.core.management import get_commands

    from memories.dispatch import Queue

    program, *arguments = call
    if program == "python":
        assert arguments[0] == "manage.py" and (ROOT / "manage.py").exists()
        assert arguments[1] in get_commands(), f"no manage.py command {arguments[1]!r}"
        return f"manage.py {arguments[1]}"
    if program == "uvicorn":
        module, attribute = arguments[0].split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        defined = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        } | {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        assert attribute in defined, f"{module} defines no {attribute}"
        return "web"
    assert program == "celery", f"the entrypoint runs an unknown program: {call}"
    assert arguments[0] == "-A"
    app = __import__(f"{arguments[1]}.celery", fromlist=["app"]).app
    assert isinstance(app, Celery)
    if arguments[2] == "beat":
        return "beat"
    assert arguments[2] == "worker"
    options = dict(zip(arguments[3::2], arguments[4::2], strict=True))
    assert options["--pool"] in ("prefork", "threads", "solo")
    assert 1 <= int(options["--concurrency"]) <= 10_000
    lanes = options["-Q"].split(",")
    assert set(lanes) <= {lane.value for lane in Queue}, lanes
    return f"worker {options['-Q']}"


def test_every_service_runs_a_command_the_code_has(tmp_path: Path) -> None:
    from memories.dispatch import Queue

    ran = {}
    for name, service in app_services().items():
        done, calls = run_entrypoint(tmp_path, service["command"], service_environment(service))
        assert done.returncode == 0, (name, done.stderr)
        assert calls, f"{name} ran nothing"
        ran[name] = [check_command(call) for call in calls]
    # The last command is the one the container execs: the service's own process.
    assert {name: commands[-1] for name, commands in ran.items()} == {
        "migrate": "manage.py migrate",
        "web": "web",
        "worker-high": "worker high",
        "worker-default": "worker default",
        "worker-batch": "worker batch",
        "beat": "beat",
        "consumers": "manage.py consume_events",
    }
    # Every lane has its worker; a worker first refuses an embedder that misfits the vectors.
    workers = [commands for name, commands in ran.items() if name.startswith("worker-")]
    assert sorted(c[-1].split()[1] for c in workers) == sorted(lane.value for lane in Queue)
    assert all(c[0] == "manage.py check" for c in workers)


def test_each_lane_takes_its_pool_and_concurrency_as_make_run_does(tmp_path: Path) -> None:
    from memoryproject.run import CONCURRENCY_SETTINGS, LANES, POOL_SETTINGS

    defaults = {**POOL_SETTINGS, **CONCURRENCY_SETTINGS}
    for lane, (pool_setting, concurrency_setting) in LANES.items():
        _, calls = run_entrypoint(tmp_path, ["worker", lane], {})
        options = dict(zip(calls[-1][4::2], calls[-1][5::2], strict=True))
        assert options["--pool"] == defaults[pool_setting], lane
        assert options["--concurrency"] == defaults[concurrency_setting], lane
        given = {pool_setting: "solo", concurrency_setting: "3"}
        _, calls = run_entrypoint(tmp_path, ["worker", lane], given)
        options = dict(zip(calls[-1][4::2], calls[-1][5::2], strict=True))
        assert (options["--pool"], options["--concurrency"]) == ("solo", "3"), lane


@pytest.mark.parametrize(
    ("command", "environment", "named"),
    [
        (["worker", "default"], {"WORKER_POOL": "fork"}, "WORKER_POOL must be one of"),
        (["worker", "batch"], {"BATCH_WORKER_CONCURRENCY": "0"}, "BATCH_WORKER_CONCURRENCY"),
        (["worker", "high"], {"HIGH_WORKER_CONCURRENCY": "lots"}, "HIGH_WORKER_CONCURRENCY"),
        (["worker", "urgent"], {}, "high, default or batch"),
    ],
)
def test_a_wrong_worker_setting_stops_the_container_naming_it(
    tmp_path: Path, command: list[str], environment: dict[str, str], named: str
) -> None:
    done, calls = run_entrypoint(tmp_path, command, environment)
    assert done.returncode == 2 and named in done.stderr
    assert calls == []  # nothing started


def test_the_image_is_pinned_runs_as_a_user_and_leaves_the_extras_out() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base[1])
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2  # build, then run
    assert re.search(r"^USER app", dockerfile, re.M)
    installs = re.findall(r"pip install ([^&\n]*)", dockerfile)
    assert installs and not any("[" in line or "-e " in line for line in installs)
    assert re.search(r"^memoryclient$", (DOCKER / "Dockerfile.dockerignore").read_text(), re.M)
    copied = re.search(r"COPY .*docker/entrypoint\.sh (\S+)", dockerfile)
    assert copied and f'ENTRYPOINT ["{copied[1]}"]' in dockerfile
    assert 'CMD ["web"]' in dockerfile


# --- Variables ---------------------------------------------------------------------------------


def test_every_variable_the_containers_are_given_is_read_by_the_code() -> None:
    reads = code_reads()
    for name, service in app_services().items():
        unread = set(service["environment"]) - reads
        assert not unread, f"{name} sets variables nothing reads: {sorted(unread)}"


def test_env_example_lists_every_setting_and_only_what_is_read() -> None:
    listed = set(env_example())
    missing = set(settings_reads()) - listed
    assert not missing, f".env.example does not list {sorted(missing)}"
    unread = listed - code_reads() - set(compose_variables())
    assert not unread, f".env.example lists variables nothing reads: {sorted(unread)}"
    unlisted = set(compose_variables()) - listed
    assert not unlisted, f"compose.yaml interpolates variables .env.example omits: {unlisted}"


def test_env_example_gives_each_setting_at_the_codes_default() -> None:
    listed = env_example()
    defaults: dict[str, list[tuple[str, Any]]] = {}
    for name, default in settings_reads().items():
        if default is not None:
            defaults.setdefault(name, []).append(("settings.py", default))
    for name, default in entrypoint_defaults().items():
        defaults.setdefault(name, []).append(("entrypoint.sh", default))
    for name, default in compose_variables().items():
        if default is not None:
            defaults.setdefault(name, []).append(("compose.yaml", default))
    for name, given in defaults.items():
        for where, default in given:
            if name in DEFAULT_DECIDED_BY_CODE:
                assert listed[name] == "", name
                continue
            assert same_value(listed[name], default), (
                f".env.example has {name}={listed[name]}, {where} defaults to {default!r}"
            )


def test_a_commented_env_example_leaves_every_setting_at_its_default() -> None:
    """docker/.env copied as it is: the settings load with only its uncommented lines set."""
    set_lines = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    assert {name for name, _ in set_lines} == {
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_DB",
        "SECRET_KEY",
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "MEMORY_"))},
        **dict(set_lines),
        "SECRET_KEY": "x",
        "DATABASE_URL": "postgresql://memory:secret@postgres:5432/memory",
        "REDIS_URL": "redis://redis:6379/0",
        "DJANGO_SETTINGS_MODULE": "memoryproject.settings",
    }
    for name in settings_reads():
        if name not in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
    probe = (
        "from django.conf import settings; print(settings.OPENAI_BASE_URL, settings.LLM_PROVIDER)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["https://api.openai.com/v1", "offline"]


# --- Alerts ------------------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "sum", "min", "max", "avg", "count", "rate", "increase", "delta",
    "histogram_quantile", "humanizePercentage", "le", "inf",
}  # fmt: skip


def exported_metrics() -> set[str]:
    """The series the service exports, as Prometheus names them: counters with `_total`,
    histograms with `_bucket`, `_sum` and `_count`."""
    names: set[str] = set()
    made = re.compile(r"\b(Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*\"([a-z_:][a-z0-9_:]*)\"")
    for path in (ROOT / "memories").rglob("*.py"):
        for kind, name in made.findall(path.read_text()):
            if kind == "Counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind == "Histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


def metrics_in(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what is left once label matchers, grouping
    clauses, ranges, strings, numbers, functions and keywords are taken out."""
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]|\"[^\"]*\"|\boffset\s+\w+", " ", expr)
    tokens = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {t for t in tokens if t not in _PROMQL_WORDS}


def test_alert_rules_parse_and_name_only_metrics_the_service_exports() -> None:
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    exported = exported_metrics() | PROMETHEUS_SERIES
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
    named: set[str] = set()
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        metrics = metrics_in(rule["expr"])
        assert metrics, f"{rule['alert']} names no metric"
        assert metrics <= exported, f"{rule['alert']} names unknown metrics {metrics - exported}"
        named |= metrics
    # What an operator must watch has its alert.
    for watched in (
        "queue_depth",
        "memory_jobs_total",
        "memory_job_stage_seconds_bucket",
        "event_outbox_oldest_unpublished_seconds",
        "event_dead_letters",
        "events_dropped_total",
        "sse_subscribers",
        "provider_errors_total",
    ):
        assert watched in named, watched


def test_the_metric_reader_of_this_test_sees_a_misspelt_metric() -> None:
    assert metrics_in('sum by (lane) (rate(memory_jobs_totl{outcome="failed"}[5m])) > 0') == {
        "memory_jobs_totl"
    }
    assert "memory_jobs_totl" not in exported_metrics()
