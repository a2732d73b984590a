PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit e2e lint bench setup clean tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# promtool, prometheus and helm for the chart, alert and scrape tests (idempotent).
tools: $(STAMP)
	VENV=$(VENV) scripts/install-test-tools.sh

run: $(STAMP)
	$(BIN)/llmgw serve

test: $(STAMP) tools
	$(BIN)/ruff check gateway tests loadtests
	$(BIN)/lint-imports
	$(BIN)/pytest -q tests

unit: $(STAMP) tools
	$(BIN)/pytest tests/unit

e2e: $(STAMP) tools
	$(BIN)/pytest tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check gateway tests loadtests
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python loadtests/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
