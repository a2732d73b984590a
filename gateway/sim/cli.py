"""Command line for one simulated provider: `llmgw sim ...` or `python -m gateway.sim ...`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import fields

from gateway.sim.profile import KINDS, Kind, SimProfile, coerce

_HELP = {
    "ttft_ms": "median time to first token (stream) / base latency (non-stream), ms",
    "ttft_dist": "TTFT distribution: fixed | lognormal",
    "ttft_sigma": "lognormal sigma",
    "tail_p": "probability that a request gets --tail-ms as its TTFT",
    "tail_ms": "TTFT of tail requests, ms",
    "itl_ms": "delay between streamed tokens, ms",
    "tokens": "completion tokens per answer (capped by the request's max_tokens)",
    "error_rate": "share of requests answered with an injected error",
    "error_status": "HTTP status of injected errors",
    "retry_after": "Retry-After value sent with injected errors",
    "stall_rate": "share of requests never answered (the connection is held open)",
    "reset_rate": "share of requests whose connection is closed mid-answer",
    "reset_after_tokens": "content tokens sent before a reset",
    "cold_schema_ms": "extra TTFT for the first request with an unseen json_schema response format, ms",
    "idle_close_s": "close keep-alive connections idle this long, like a load balancer (0 = never)",
    "require_key": "answer 401 unless the request carries this key (Bearer or api-key)",
    "embedding_dim": "embedding vector size when the request gives no 'dimensions'",
    "prefix_cache_tokens": "capacity of the prompt-prefix cache (LRU of 16-token blocks), tokens (0 = none)",
    "prefill_ms_per_1k": "extra TTFT per 1,000 prompt tokens not served from the prefix cache, ms",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=9101, help="port to bind, 0 for any (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default="sim", help="name in content tokens and stats (default: %(default)s)"
    )
    parser.add_argument("--region", default="local", help="region reported in stats (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    defaults = SimProfile()
    knobs = parser.add_argument_group("profile (each also settable per request with an x-sim-<knob> header)")
    for f in fields(SimProfile):
        choices = ("fixed", "lognormal") if f.name == "ttft_dist" else None
        metavar = {Kind.FLOAT: "N", Kind.INT: "N"}.get(KINDS[f.name], "TEXT")
        knobs.add_argument(
            "--" + f.name.replace("_", "-"),
            dest="knob_" + f.name,
            default=None,
            choices=choices,
            metavar=None if choices else metavar,
            help=f"{_HELP.get(f.name, f.name)} (default: {getattr(defaults, f.name)})",
        )


def profile_from_args(args: argparse.Namespace) -> SimProfile:
    """The profile the flags describe; ValueError names a bad flag."""
    profile = SimProfile()
    patch = {}
    for name in KINDS:
        value = getattr(args, "knob_" + name, None)
        if value is not None:
            try:
                patch[name] = coerce(name, value)
            except ValueError as exc:
                raise ValueError(f"--{name.replace('_', '-')}: {exc}") from None
    profile.update(patch)
    return profile


def run(args: argparse.Namespace) -> int:
    """Run one SimServer until SIGINT/SIGTERM."""
    try:
        profile = profile_from_args(args)
    except ValueError as exc:
        print(f"llmgw sim: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(_serve(args, profile))
    except OSError as exc:
        print(f"llmgw sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace, profile: SimProfile) -> int:
    from gateway.sim.server import SimServer

    server = SimServer(
        profile, name=args.name, region=args.region, host=args.host, port=args.port, seed=args.seed
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"llmgw sim {server.name!r} (region {server.region}) listening on http://{server.host}:{server.port}/v1",
        flush=True,
    )
    await stop.wait()
    await server.stop()
    return 0
