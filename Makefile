# Two commands: `make run` and `make test`. Both bootstrap what they need and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UPSTREAM ?=
ARGS ?=
# Debian packages the test suite and the benchmark drive as real peers.
TEST_DEB := curl openssl chromium nginx-light caddy wrk hey fonts-liberation redis-server pebble testssl.sh prometheus

.PHONY: run test bench lint deps sysdeps clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found: install Python 3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

deps: $(STAMP)

sysdeps:
	@bash scripts/sysdeps.sh $(TEST_DEB)

run: $(STAMP)
	$(BIN)/garrison up $(if $(UPSTREAM),--upstream $(UPSTREAM),--demo) $(ARGS)

test: $(STAMP) sysdeps
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) sysdeps
	$(BIN)/python -m bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts
