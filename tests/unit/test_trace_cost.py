"""What OTLP export costs a request it does not sample: under 3 % of an untraced request's work.

Counted as test_work_budget.py counts (gateway bytecode instructions per proxied request, the same
app driven through ASGI, no clock), with export off and with export on but nothing sampled. An
unsampled request runs no OpenTelemetry code at all (the decision is the gateway's own, spans are
only built afterwards for sampled requests), so the gateway's instructions are its whole extra cost;
against the untraced request's gateway instructions alone (library and C work excluded) the share
is an upper bound of the CPU share.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_work_budget import MEASURED, _body, _config, count_requests

from gateway.app import build_app
from gateway.config import TracingConfig
from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer

MAX_UNSAMPLED_SHARE = 0.03


async def _per_request(tmp: Path, tracing: TracingConfig | None) -> float:
    profile = SimProfile()
    profile.update({"ttft_ms": 0, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 8, "tail_p": 0})
    sims = [SimServer(profile, name=n, region="us-east", seed=0) for n in ("sim-a", "sim-b")]
    for s in sims:
        await s.start()
    cfg = _config(sims[0].port, sims[1].port, tmp / "access.jsonl")
    if tracing is not None:
        cfg = cfg.model_copy(update={"tracing": tracing})
    app = build_app(cfg, seed=0)
    await app.lifecycle.start()
    try:
        counter, status, out = await count_requests(app, _body(False))
        assert status == 200, out
        assert (app.engine.tracing is not None) == (tracing is not None)
        return sum(counter.instructions.values()) / MEASURED
    finally:
        await app.lifecycle.stop()
        for s in sims:
            await s.stop()


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    # a closed port on loopback: nothing is sampled, so nothing would be sent anyway
    export = TracingConfig(otlp_endpoint="http://127.0.0.1:9")
    mp = pytest.MonkeyPatch()
    out: dict[str, Any] = {}
    try:
        out["off"] = asyncio.run(_per_request(tmp_path_factory.mktemp("off"), None))
        mp.setenv("OTEL_TRACES_SAMPLER", "always_off")
        out["unsampled"] = asyncio.run(_per_request(tmp_path_factory.mktemp("unsampled"), export))
        mp.setenv("OTEL_TRACES_SAMPLER", "always_on")
        mp.setenv(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1"
        )  # the flush at shutdown gives up on the closed port soon
        out["sampled"] = asyncio.run(_per_request(tmp_path_factory.mktemp("sampled"), export))
    finally:
        mp.undo()
    return out


def test_an_unsampled_request_costs_under_three_percent_more(instructions):
    off, unsampled = instructions["off"], instructions["unsampled"]
    share = (unsampled - off) / off
    assert share < MAX_UNSAMPLED_SHARE, (
        f"export on, not sampled: {unsampled:.0f} instructions per request against {off:.0f} untraced "
        f"(+{share:.1%}, limit {MAX_UNSAMPLED_SHARE:.0%})"
    )


def test_the_counter_sees_tracing_work(instructions):
    # a sampled request builds its spans in gateway code: the measure above can see tracing work
    assert instructions["sampled"] - instructions["off"] > 5 * max(
        instructions["unsampled"] - instructions["off"], 1
    )
