# Two commands for a fresh machine: `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv and install what they need on first use.

# The first interpreter that runs and is >= 3.11 (pyenv shims may exist for versions not active).
PYTHON ?= $(or $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done),python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml bench/pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck unit integration bench up down status clean venv

# bench/: `pulse bench`, a development-only distribution (pulse-bench), outside the wheel
$(STAMP): pyproject.toml bench/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Pulse needs Python 3.11 or newer (found " + sys.version.split()[0] + ").")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./bench
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pulse demo

# Integration tests share one local stack and run one at a time; unit tests run on every core.
test: lint typecheck
	$(BIN)/pytest tests/integration
	$(BIN)/pytest -n auto tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy tests

unit: $(STAMP)
	$(BIN)/pytest -n auto tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

bench: $(STAMP)
	$(BIN)/pulse bench

up down status: $(STAMP)
	$(BIN)/pulse $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
