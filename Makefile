PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed
PORT ?= 8080
# the demo's access log (JSON lines, read by `llmgw report`); ACCESS_LOG=- writes it to stdout instead
ACCESS_LOG ?= access.log

.PHONY: run test test-compiled unit e2e clients lint bench setup node-deps clean tools

# `make run` needs the gateway and the SDK the README uses, nothing else: no test tools, no pip self-upgrade
# (each costs downloads on a fresh clone)
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[demo,dev,compat]'
	touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP)

node-deps: $(NODE_STAMP)

run: $(RUN_STAMP)
	LLMGW_ACCESS_LOG=$(ACCESS_LOG) $(BIN)/llmgw serve --port $(PORT)

# promtool, prometheus and helm for the chart, alert and scrape tests, tinyproxy for the egress-proxy tests (idempotent).
tools: $(STAMP)
	VENV=$(VENV) scripts/install-test-tools.sh

test: $(STAMP) $(NODE_STAMP) tools
	$(BIN)/ruff check gateway tests loadtests scripts setup.py
	$(BIN)/ruff format --check gateway tests loadtests scripts setup.py
	$(BIN)/lint-imports
	$(BIN)/mypy gateway
	$(BIN)/python tests/with_redis.py $(BIN)/pytest -q tests

# The compiled build (LLMGW_COMPILE=1: setup.py, docs/benchmarks.md), as the image ships it, under the e2e
# suite: mypyc checks annotations at run time, so a wrong one fails there and nowhere else. Its own venv
# (the lock, then the package, compiled: about three minutes); the tests' tools are the dev venv's.
# Left out: the files that start no gateway through the harness (the CLI, the demo, the simulator and the
# upstream clients run from this tree, in-process or as `python -m gateway`): they test nothing compiled.
COMPILED_VENV ?= .venv-compiled
NOT_COMPILED := cli demo readme sim sim_content h1_client upstream_clients
test-compiled: $(STAMP) $(NODE_STAMP) tools
	test -x $(COMPILED_VENV)/bin/python || $(PY) -m venv $(COMPILED_VENV)
	$(COMPILED_VENV)/bin/pip install -q --no-deps -r requirements.lock
	LLMGW_COMPILE=1 $(COMPILED_VENV)/bin/pip install -q --no-deps --force-reinstall .
	LLMGW_GATEWAY_PYTHON=$(COMPILED_VENV)/bin/python $(BIN)/python tests/with_redis.py $(BIN)/pytest -q tests/e2e \
		$(foreach f,$(NOT_COMPILED),--ignore=tests/e2e/test_$(f).py)

unit: $(STAMP) tools
	$(BIN)/pytest tests/unit

e2e: $(STAMP) $(NODE_STAMP) tools
	$(BIN)/python tests/with_redis.py $(BIN)/pytest tests/e2e

clients: $(STAMP) $(NODE_STAMP)
	$(BIN)/python tests/with_redis.py $(BIN)/pytest tests/e2e/test_clients.py tests/e2e/test_readme.py

lint: $(STAMP)
	$(BIN)/ruff check gateway tests loadtests scripts setup.py
	$(BIN)/ruff format --check gateway tests loadtests scripts setup.py
	$(BIN)/lint-imports
	$(BIN)/mypy gateway

# The headline benchmark: direct, the Python floor, the lean Python proxy, Envoy, Portkey (where Node.js is),
# llmgw and LiteLLM side by side in one interleaved run (installs the peers under /tmp/peers first; see loadtests/README.md).
bench: $(STAMP)
	bash loadtests/peers/setup.sh
	BENCH_PY=$${BENCH_PY:-/tmp/peers/bench-venv/bin/python} GATEWAY_PY=$${GATEWAY_PY:-/tmp/peers/gateway-venv/bin/python} \
		$(BIN)/python loadtests/bench.py --with-litellm

clean:
	rm -rf $(VENV) $(COMPILED_VENV) build *.egg-info tests/node/node_modules
