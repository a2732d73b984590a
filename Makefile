PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit e2e lint bench setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/llmgw serve

test: $(STAMP)
	$(BIN)/ruff check gateway tests loadtests
	$(BIN)/lint-imports
	$(BIN)/mypy gateway/engine gateway/upstream gateway/policy
	$(BIN)/pytest -q tests

unit: $(STAMP)
	$(BIN)/pytest tests/unit

e2e: $(STAMP)
	$(BIN)/pytest tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check gateway tests loadtests
	$(BIN)/lint-imports
	$(BIN)/mypy gateway/engine gateway/upstream gateway/policy

# The headline benchmark: direct, the Python floor, Envoy, Portkey (where Node.js is), llmgw and LiteLLM,
# side by side in one interleaved run (installs the peers under /tmp/peers first; see loadtests/README.md).
bench: $(STAMP)
	bash loadtests/peers/setup.sh
	BENCH_PY=$${BENCH_PY:-/tmp/peers/bench-venv/bin/python} $(BIN)/python loadtests/bench.py --with-litellm

clean:
	rm -rf $(VENV) build *.egg-info
