"""`llmgw`: serve | check-config | warmup | report | sim | keys."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import tempfile
from importlib import resources
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config, redact

EXIT_CONFIG = 2

# The embedded demo's simulated providers: (name, region, profile knobs).
DEMO_SIMS = (
    ("sim-us-east", "us-east", {"ttft_ms": 300.0, "ttft_sigma": 0.35, "tail_p": 0.03, "tail_ms": 2000.0, "itl_ms": 20.0}),
    ("sim-eu-west", "eu-west", {"ttft_ms": 450.0, "ttft_sigma": 0.35, "tail_p": 0.03, "tail_ms": 2000.0, "itl_ms": 25.0}),
)


def demo_config_path() -> str:
    return str(resources.files("gateway") / "demo" / "demo.yaml")


def start_demo_sims() -> Any:
    """Start the demo's simulated providers in a background thread; export their ports for the config."""
    from gateway.sim.profile import SimProfile
    from gateway.sim.runner import SimThread

    specs = []
    for name, region, knobs in DEMO_SIMS:
        p = SimProfile()
        p.update(knobs)
        specs.append((name, region, p))
    sims = SimThread(specs)
    ports = sims.start()
    for name, port in ports.items():
        os.environ[name.upper().replace("-", "_") + "_PORT"] = str(port)
    return sims


def _load(path: str) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"llmgw: invalid config {path}:\n{exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fresh_multiprocess_dir() -> None:
    """Metrics files of workers from an earlier run (a restarted container keeps its emptyDir) would
    inflate every gauge and counter: start from an empty directory."""
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not d:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llmgw-metrics-")
        return
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):
        if name.endswith(".db"):
            os.unlink(os.path.join(d, name))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.api.protocol import TimedHttpToolsProtocol
    from gateway.app import DRAIN_GRACE_S

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    sims = None
    path = args.config
    if path is None:
        sims = start_demo_sims()
        path = demo_config_path()
        print("llmgw: no --config given: serving the embedded demo (simulated providers in us-east and eu-west)",
              file=sys.stderr)
    cfg = _load(path)
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    workers = args.workers or cfg.server.workers
    if args.region:
        os.environ["GATEWAY_REGION"] = args.region
    if not _is_loopback(host) and cfg.auth.mode == "none":
        logging.getLogger("llmgw").warning(
            "listening on %s without API keys (auth.mode: none): anyone who can reach it can spend your provider quota",
            host)
    common: dict[str, Any] = dict(host=host, port=port, loop="uvloop", http=TimedHttpToolsProtocol, lifespan="on",
                                  access_log=False, log_level=args.log_level, server_header=False,
                                  timeout_graceful_shutdown=cfg.server.drain_timeout_s + DRAIN_GRACE_S, backlog=4096,
                                  timeout_keep_alive=75,
                                  # the access log records the peer as connected; uvicorn's X-Forwarded-For
                                  # rewriting (trusting 127.0.0.1 only) would cost every request a middleware
                                  proxy_headers=False)
    # uvicorn re-raises SIGTERM/SIGINT once it has drained, to let the previous handler act; a no-op
    # handler makes that a clean exit 0, which is what orchestrators expect from a graceful stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        if workers == 1:
            from gateway.app import build_app

            server = uvicorn.Server(uvicorn.Config(build_app(cfg), **common))
            server.run()
            return 0 if server.started else 1
        # Several workers: each builds its own app from the config file; metrics merge through a shared dir.
        os.environ["LLMGW_CONFIG"] = os.path.abspath(path)
        _fresh_multiprocess_dir()
        uvicorn.run("gateway.app:create_app", factory=True, workers=workers, **common)
        return 0
    finally:
        if sims is not None:
            sims.stop()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    data = redact(cfg)
    home = os.environ.get("GATEWAY_REGION") or cfg.server.region or "-"
    print(f"config OK: {len(cfg.models)} model(s), state={cfg.state.backend}, auth={cfg.auth.mode}, region={home}")
    print()
    print(f"{'MODEL':<22} {'DEPLOYMENT':<24} {'REGION':<12} {'UPSTREAM MODEL':<22} {'BASE URL':<40} {'KEY':<5} FALLBACKS")
    for m in data["models"]:
        for d in m["deployments"]:
            print(f"{m['name']:<22} {d['id']:<24} {d['region']:<12} {(d['model'] or m['name']):<22} "
                  f"{d['base_url']:<40} {'***' if d['api_key'] else '-':<5} {','.join(m['fallbacks']) or '-'}")
    if args.verbose:
        import yaml

        print()
        print(yaml.safe_dump(data, sort_keys=False))
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from gateway.sim import cli as sim_cli

    return sim_cli.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.telemetry import report

    return report.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmgw", description="OpenAI-compatible, latency-aware LLM gateway")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (no --config: the embedded demo with simulated providers)")
    s.add_argument("--config", "-c", help="gateway config YAML")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--region", help="the gateway's own region (overrides server.region and GATEWAY_REGION)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config and print the resolved routing table")
    c.add_argument("file")
    c.add_argument("--verbose", "-v", action="store_true", help="also print the full resolved config (redacted)")
    c.set_defaults(func=cmd_check_config)

    sm = sub.add_parser("sim", help="run a simulated OpenAI-compatible provider")
    from gateway.sim import cli as sim_cli

    sim_cli.add_arguments(sm)
    sm.set_defaults(func=cmd_sim)

    r = sub.add_parser("report", help="latency report from access logs: percentiles and tail causes")
    from gateway.telemetry import report

    report.add_arguments(r)
    r.set_defaults(func=cmd_report)

    from gateway.cli_more import add_more_commands

    add_more_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
