"""e2e fixtures: the pytest fixtures only; the harness they build on (and tests import) is harness.py."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import GATEWAY_PYTHON, OTHER_GATEWAY_PYTHON, Gateway, Sims, free_port, reap


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under LLMGW_GATEWAY_PYTHON (`make test-compiled`), the gateways must run the compiled build: a venv
    holding the plain package would pass every test without testing what it is there for."""
    if OTHER_GATEWAY_PYTHON:
        probe = (
            "import gateway.engine.exchange as m, gateway.policy.routing as r; print(m.__file__, r.__file__)"
        )
        files = subprocess.run(
            [GATEWAY_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/"
        ).stdout.split()
        if len(files) != 2 or not all(f.endswith(".so") for f in files):
            raise pytest.UsageError(f"LLMGW_GATEWAY_PYTHON={GATEWAY_PYTHON} runs no compiled build: {files}")


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Any]:
    """Factory: gateways(cfg, **kw) starts a gateway; all are stopped at the end of the test."""
    started: list[Gateway] = []

    def make(cfg: dict[str, Any], **kw: Any) -> Gateway:
        g = Gateway(cfg, tmp_path, name=f"gw{len(started)}", **kw)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop_soon()


@pytest.fixture(scope="session", autouse=True)
def _reap_gateways() -> Iterator[None]:
    """No gateway a test asked to stop outlives the run."""
    yield
    reap(wait=True)


@pytest.fixture
def sims_factory() -> Iterator[Any]:
    made: list[Sims] = []

    def make(specs: dict[str, tuple[str, dict[str, Any]]], seed: int | None = None) -> Sims:
        s = Sims(specs, seed)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def private_redis() -> Iterator[tuple[int, subprocess.Popen]]:
    """A redis-server of the test's own on a free port, so the test may kill it: (port, process)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            redis.Redis(port=port).ping()
            break
        except Exception:
            time.sleep(0.05)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key prefix per test so tests sharing the real Redis never see each other's keys."""
    return f"llmgw-test-{os.getpid()}-{time.monotonic_ns()}:"
