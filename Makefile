# flashsale: make install | lint | test | fuzz | demo | bench | stack-down | lock
# Everything runs from a local virtualenv (.venv) built with the machine's python3 (>= 3.11).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every dependency, transitive ones included, pinned with its hashes (`make lock` writes both files).
LOCK     := requirements.lock
DEV_LOCK := requirements-dev.lock
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -q

.PHONY: install lint format typecheck test test-fast fuzz demo bench wrk stack-down clean compose-validator lock

$(STAMP): pyproject.toml $(DEV_LOCK) $(shell find src infra -type f -not -name "*.pyc")
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flashsale needs Python >= 3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# After changing the dependencies in pyproject.toml: pin them again, then `make install`.
lock: install
	$(UV_COMPILE) -o $(LOCK)
	$(UV_COMPILE) --extra dev -o $(DEV_LOCK)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

typecheck: install
	$(BIN)/mypy

# The whole suite on the real stack: installs and starts Redis, MariaDB and RocketMQ if they are missing.
test: install compose-validator
	$(BIN)/flashsale stack up
	$(BIN)/python -m pytest --durations=10 $(PYTEST_ARGS)

# docker-compose.yml is checked with `docker compose config`; without the compose plugin, Debian's
# docker-compose validates the same file offline (no engine needed).
compose-validator:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null

# The protocol's state machines on the real scripts for a time budget, from a seed (before a release):
# `make fuzz SEED=7 MINUTES=30`. SEED=0 picks one and prints it; a finding prints its steps and fails.
SEED ?= 0
MINUTES ?= 30
fuzz: install
	$(BIN)/flashsale stack up redis
	$(BIN)/python -m tests.protocol.fuzz --seed $(SEED) --minutes $(MINUTES)

# Unit tests only (no servers).
test-fast: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The main job: a flash sale on the real stack, then the reconcile report.
demo: install
	$(BIN)/flashsale demo

bench: install
	$(BIN)/flashsale stack up
	$(BIN)/flashsale init
	$(BIN)/flashsale bench --strategy mysql-lock,mysql-optimistic,pipeline-b1,pipeline,bucketed --plot bench.png
	$(BIN)/flashsale bench --unpaid 0.3 --pay-within 5s --stock 1000 --attempts 15000 --buyers 200
	$(BIN)/python -m tests.benchmarks.ops_bounds
	$(BIN)/python -m tests.benchmarks.redis_stage
	$(BIN)/python -m tests.benchmarks.scale_e2e

# What a client sees, from outside: Debian's wrk against a producer, live stock and sold out.
wrk: install
	@command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk >/dev/null
	$(BIN)/flashsale stack up
	$(BIN)/python -m tests.benchmarks.wrk_bench --validating

stack-down: install
	$(BIN)/flashsale stack down

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
