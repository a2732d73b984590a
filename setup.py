"""The package's build: pure Python by default; with LLMGW_COMPILE=1, the request path is compiled with mypyc.

The compiled build runs the same source as C extensions: about a third fewer instructions per proxied request
(docs/benchmarks.md, "The compiled build"). The Docker image and the benchmark build it; a development install
(`pip install -e .`, `make setup`) never does: a compiled module would shadow the .py file being edited.
"""

import os

from setuptools import setup

# The modules every request runs through (the work-budget test's hot path). Everything else (config,
# CLI, report, simulator) stays interpreted: start-up and tooling code gains nothing from compiling.
COMPILED = [
    "gateway/engine",
    "gateway/policy",
    "gateway/api/asgi.py",
    "gateway/api/jsonlimits.py",
    "gateway/upstream/h1.py",
    "gateway/upstream/wire.py",
    "gateway/telemetry/accesslog.py",
    "gateway/telemetry/metrics.py",
    "gateway/telemetry/timing.py",
    "gateway/telemetry/tracing.py",
]

ext_modules = []
if os.environ.get("LLMGW_COMPILE") == "1":
    from mypyc.build import mypycify

    # mypy's own settings for the build: its dependencies are not in the isolated build environment, so
    # their types are unknown (Any) to the compiler, as to `mypy` without them; the repo's [tool.mypy]
    # loads the pydantic plugin, which is not there either.
    ext_modules = mypycify(["--config-file", "scripts/compile/mypyc.ini", *COMPILED], opt_level="3")

setup(ext_modules=ext_modules)
