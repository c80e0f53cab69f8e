# One entry point for tooling. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS := tests/js

.PHONY: run test lint schema bench redis-server chromium js-clients wrk clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## Serve on http://127.0.0.1:8000 with the embedded store, in dev mode (prints a demo key).
run: $(STAMP)
	GATEWAY_DEV=1 $(BIN)/gateway serve

# The modules that carry the data path end to end, run again on a plain Redis (the suite's
# own is a one-node Cluster): a plain Redis gets the other client (docs/api.md#redis-connection).
ON_PLAIN_REDIS := tests/test_gateway.py tests/test_admission.py tests/test_credits.py \
	tests/test_durability.py tests/test_waiting.py tests/test_cache.py tests/test_routing.py \
	tests/test_http_errors.py tests/test_live_updates.py

## Install redis-server, chromium and the JS clients if missing; lint; run the whole suite,
## then its data path again on a plain Redis.
test: lint redis-server chromium js-clients
	$(BIN)/python -m pytest -q
	GATEWAY_TEST_REDIS=plain $(BIN)/python -m pytest -q $(ON_PLAIN_REDIS)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

## The real browser of tests/browser.py (Playwright drives Debian's chromium).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@chromium --version 2>/dev/null

## The JavaScript clients of tests/test_js_clients.py (Apollo Client, graphql-ws) and
## tests/test_js_openai.py (OpenAI's `openai` SDK), as
## tests/js/package-lock.json pins them: `npm ci` when node_modules is missing or older
## than the lock file. Node 20 is what they are run with; without npm, Debian's nodejs
## and npm are installed.
js-clients: $(JS)/node_modules/.package-lock.json

$(JS)/node_modules/.package-lock.json: $(JS)/package-lock.json $(JS)/package.json
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }
	@node --version
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

## ruff (lint and format), mypy (config in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Rewrite schema/schema.graphql from the code.
schema: $(STAMP)
	$(BIN)/python -m schema

## Micro-benchmarks (admission) and HTTP load against the served gateway (see BENCHMARKS.md).
bench: $(STAMP) redis-server wrk
	$(BIN)/python -m bench

wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; }
	@wrk --version 2>&1 | head -1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
