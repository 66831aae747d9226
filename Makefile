# Two commands on a fresh machine:
#   make run    the service, with an embedded Redis unless ACTIVITY_REDIS_URL is set
#   make test   every check and the whole test suite
# Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN_STAMP  := $(VENV)/.run-installed
DEV_STAMP  := $(VENV)/.dev-installed
PYTEST_ARGS ?=

.PHONY: run test check lint format typecheck stubs proto tools clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/activity-server

tools: $(DEV_STAMP)
	bash scripts/install-tools.sh

check: lint typecheck stubs

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check service tests scripts
	$(VENV)/bin/ruff format --check service tests scripts

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format service tests scripts
	$(VENV)/bin/ruff check --fix service tests scripts

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy

stubs: $(DEV_STAMP)
	$(PY) scripts/gen_proto.py --check
	cd proto && ../$(VENV)/bin/buf lint

proto: $(DEV_STAMP)
	$(PY) scripts/gen_proto.py

test: tools check
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist
