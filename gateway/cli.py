"""`llmgw`: serve | check-config | warmup | report | sim | keys (each with --help)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config, redact

EXIT_CONFIG = 2
EXIT_STARTUP = 3  # a worker could not start (port taken, start-up check failed): uvicorn's own code

# The embedded demo's simulated providers: (name, region, profile knobs).
DEMO_SIMS = (
    (
        "sim-us-east",
        "us-east",
        {"ttft_ms": 300.0, "ttft_sigma": 0.35, "tail_p": 0.03, "tail_ms": 2000.0, "itl_ms": 20.0},
    ),
    (
        "sim-eu-west",
        "eu-west",
        {"ttft_ms": 450.0, "ttft_sigma": 0.35, "tail_p": 0.03, "tail_ms": 2000.0, "itl_ms": 25.0},
    ),
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


def _load_demo(path: str) -> GatewayConfig:
    """The demo's config before its simulators run (their ports are placeholders): for host and port."""
    for name, _region, _knobs in DEMO_SIMS:
        os.environ.setdefault(name.upper().replace("-", "_") + "_PORT", "1")
    return _load(path)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound, or None: checked before anything starts, so a port in use is one
    clear line at once instead of a traceback after start-up."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the address is already in use (choose another port: --port, or `make run PORT=8081`)"
            return exc.strerror or str(exc)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 (Python 3.11 says it is not loopback)
    return addr.is_loopback


def unguarded_warning(host: str, cfg: GatewayConfig) -> str | None:
    """What start-up says (``serve`` logs it, ``check-config`` prints it) about a port that answers without
    a key, or None: reachable from other machines (``host`` not loopback), or from any web page because
    ``server.allowed_hosts`` has "*". Without a key the Host check (allowed_hosts) is all that keeps a
    page out that points its own name at the gateway's address (DNS rebinding, api/headers.py)."""
    if cfg.auth.mode != "none":
        return None
    any_host = "*" in cfg.server.allowed_hosts
    if is_loopback(host):
        if not any_host:
            return None
        return (
            'server.allowed_hosts "*" with auth.mode none: any web page opened in a browser on this machine can '
            f"reach the gateway by pointing its own name at {host} (DNS rebinding) and spend your provider "
            "quota. List the names clients call it by instead (IP addresses and localhost need no entry), "
            "or set auth.mode: keys (docs/security.md)."
        )
    warning = (
        f"listening on {host} without API keys (auth.mode: none): anyone who can reach it can spend your "
        "provider quota. Set auth.mode: keys (docs/security.md) or listen on 127.0.0.1 behind your own proxy."
    )
    if any_host:
        return warning + (
            ' And server.allowed_hosts "*" lets any web page reach it too: a page points its own name at this '
            "address (DNS rebinding) and the browsers that open it call the gateway. List the names clients "
            "call it by instead (IP addresses and localhost need no entry)."
        )
    return warning + (
        " Without keys, server.allowed_hosts is what keeps web pages out (DNS rebinding: a page pointing its "
        "own name at this address): only requests sent to an IP address, localhost or a name listed there "
        'are answered. List there the names clients call it by, never "*".'
    )


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
    import logging.config

    import uvicorn

    from gateway.api.protocol import TimedHttpToolsProtocol
    from gateway.app import CONFIG_ENV, DRAIN_GRACE_S, SERVER_ENV, SUPERVISOR_ENV, with_server
    from gateway.telemetry.logs import log_config
    from gateway.upstream.select import selected_kind

    logging_cfg = log_config(args.log_level)
    logging.config.dictConfig(logging_cfg)
    sims = None
    path = args.config
    if path is None:
        path = demo_config_path()
        cfg = _load_demo(path)
    else:
        cfg = _load(path)
    try:
        selected_kind()  # LLMGW_UPSTREAM_CLIENT, read once per process: a typo is one line, not a traceback
    except ValueError as exc:
        print(f"llmgw: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    warning = unguarded_warning(host, cfg)
    if warning is not None:  # about the config: said even when the port then turns out to be taken
        logging.getLogger("llmgw").warning(warning)
    problem = _cannot_listen(host, port)
    if problem is not None:
        print(f"llmgw: cannot listen on {host}:{port}: {problem}", file=sys.stderr)
        return 1
    if args.config is None:
        sims = start_demo_sims()
        cfg = _load(path)  # again, now that the simulators' ports are known
        print(
            f"llmgw: no --config given: serving the embedded demo on http://{host}:{port}/v1 (simulated providers "
            f"in us-east and eu-west; access log: {cfg.access_log.path})",
            file=sys.stderr,
        )
    workers = cfg.server.workers if args.workers is None else args.workers
    server_changes = {"host": host, "port": port, "workers": workers}
    cfg = with_server(cfg, server_changes)
    if args.region:
        os.environ["GATEWAY_REGION"] = args.region
    common: dict[str, Any] = dict(
        host=host,
        port=port,
        loop="uvloop",
        http=TimedHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        log_level=args.log_level,
        log_config=logging_cfg,
        server_header=False,
        timeout_graceful_shutdown=cfg.server.drain_timeout_s + DRAIN_GRACE_S,
        backlog=4096,
        timeout_keep_alive=cfg.server.idle_timeout_s,
        # the access log records the peer as connected; uvicorn's X-Forwarded-For
        # rewriting (trusting 127.0.0.1 only) would cost every request a middleware
        proxy_headers=False,
    )
    # uvicorn re-raises SIGTERM/SIGINT once it has drained, to let the previous handler act; a no-op
    # handler makes that a clean exit 0, which is what orchestrators expect from a graceful stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        if workers == 1:
            from gateway.app import build_app
            from gateway.workers import listening_socket

            config = uvicorn.Config(build_app(cfg), **common)
            server = uvicorn.Server(config)
            server.run(sockets=[listening_socket(config)])
            return 0 if server.started else EXIT_STARTUP
        # Several workers: each builds its own app from the config file; metrics merge through a shared dir.
        from gateway.workers import run_workers

        os.environ[CONFIG_ENV] = os.path.abspath(path)
        os.environ[SERVER_ENV] = json.dumps(server_changes)
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        _fresh_multiprocess_dir()
        return run_workers(
            uvicorn.Config("gateway.app:create_app", factory=True, workers=workers, **common),
            os.environ["PROMETHEUS_MULTIPROC_DIR"],
        )
    finally:
        if sims is not None:
            sims.stop()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    data = redact(cfg)
    home = os.environ.get("GATEWAY_REGION") or cfg.server.region or "-"
    print(
        f"config OK: {len(cfg.models)} model(s), state={cfg.state.backend}, auth={cfg.auth.mode}, region={home}"
    )
    print()
    print(
        f"{'MODEL':<22} {'DEPLOYMENT':<24} {'REGION':<12} {'UPSTREAM MODEL':<22} {'BASE URL':<40} {'KEY':<5} FALLBACKS"
    )
    for m in data["models"]:
        for d in m["deployments"]:
            print(
                f"{m['name']:<22} {d['id']:<24} {d['region']:<12} {(d['model'] or m['name']):<22} "
                f"{d['base_url']:<40} {'***' if d['api_key'] else '-':<5} {','.join(m['fallbacks']) or '-'}"
            )
    warning = unguarded_warning(cfg.server.host, cfg)
    if warning is not None:
        print(f"\nwarning: {warning}", file=sys.stderr)
    if args.verbose:
        import yaml

        print()
        print(yaml.safe_dump(data, sort_keys=False))
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    return asyncio.run(_warmup(_load(args.config), not args.no_learned))


async def _warmup(cfg: GatewayConfig, learned: bool) -> int:
    """One pass of the server's own warm-up (gateway/upstream/warmup.py) over every model, then a report."""
    from gateway.state.redis import make_state
    from gateway.upstream import warmup
    from gateway.upstream.base import UpstreamClient
    from gateway.upstream.schemas import SchemaLearner
    from gateway.upstream.select import make_client

    backend = make_state(cfg.state)
    learner = SchemaLearner(backend, ttl_s=cfg.state.key_ttl_s, max_per_model=10_000) if learned else None
    clients: list[UpstreamClient] = []
    failed_required = False
    total = 0
    print(f"{'MODEL':<20} {'DEPLOYMENT':<24} {'SCHEMA':<28} {'RESULT':<8} {'MS':>9}  DETAIL")
    try:
        for m in cfg.models:
            deployments = []
            for d in m.deployments:
                c = make_client(d)
                clients.append(c)
                deployments.append((c, d.model or m.name))
            for mw in await warmup.plan([(m.name, m.warmup, deployments)], learner):
                for c, _ in deployments:
                    await c.start()
                for r in await warmup.warm_pass(mw):
                    total += 1
                    print(
                        f"{r.model:<20} {r.deployment:<24} {r.schema[:28]:<28} {'ok' if r.ok else 'FAILED':<8} "
                        f"{r.ms:>9.1f}  {r.detail}"
                    )
                    if not r.ok and m.warmup.required:
                        failed_required = True
    finally:
        for c in clients:
            await c.close()
        try:
            await backend.close()
        except Exception:
            pass
    print(
        f"\n{total} warm-up request(s); {'a REQUIRED warm-up failed' if failed_required else 'all required ok'}"
    )
    return 1 if failed_required else 0


def cmd_sim(args: argparse.Namespace) -> int:
    from gateway.sim import cli as sim_cli

    return sim_cli.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.telemetry import report

    return report.run(args)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer from lo to hi, as the config key it overrides allows (a --workers of
    1000 would fork a thousand processes; a negative one started none and hung every request)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({lo} to {hi})")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmgw", description="OpenAI-compatible, latency-aware LLM gateway")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the gateway (no --config: the embedded demo with simulated providers)",
        description="Run the gateway. Without --config it serves the embedded demo: two simulated "
        "providers started in-process, models demo-chat, demo-fast and demo-embed.",
    )
    s.add_argument("--config", "-c", metavar="FILE", help="gateway config YAML (default: the embedded demo)")
    s.add_argument("--host", help="address to listen on (default: server.host)")
    s.add_argument("--port", type=_int_in(0, 65535), help="port to listen on (default: server.port)")
    s.add_argument(
        "--workers", type=_int_in(1, 256), help="worker processes, 1-256 (default: server.workers)"
    )
    s.add_argument("--region", help="the gateway's own region (overrides server.region and GATEWAY_REGION)")
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log level on stderr (default: %(default)s)",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "check-config",
        help="validate a config and print the resolved routing table",
        description="Validate a config: report every problem at once (unset ${VAR}s, invalid keys), "
        "warn about risky settings, print the routing table with secrets redacted.",
    )
    c.add_argument("file", help="gateway config YAML")
    c.add_argument(
        "--verbose", "-v", action="store_true", help="also print the full resolved config (redacted)"
    )
    c.set_defaults(func=cmd_check_config)

    w = sub.add_parser(
        "warmup",
        help="warm every configured and learned schema on every deployment, then exit",
        description="Send each json_schema to each deployment once (as a Helm hook does before "
        "traffic). Exits non-zero when a warm-up marked required fails.",
    )
    w.add_argument("--config", "-c", required=True, metavar="FILE", help="gateway config YAML")
    w.add_argument(
        "--no-learned", action="store_true", help="skip schemas learned from traffic (state backend)"
    )
    w.set_defaults(func=cmd_warmup)

    sm = sub.add_parser(
        "sim",
        help="run a simulated OpenAI-compatible provider",
        description="A simulated OpenAI-compatible provider: realistic latency, faults on demand, "
        "tool calls and structured output, and /sim/stats telling what it saw.",
    )
    from gateway.sim import cli as sim_cli

    sim_cli.add_arguments(sm)
    sm.set_defaults(func=cmd_sim)

    r = sub.add_parser(
        "report",
        help="latency report from access logs: percentiles and tail causes",
        description="Summarise a JSON access log (a file, '-' for stdin): latency percentiles by model "
        "and deployment, and which causes (hedges, retries, cold schemas ...) explain the tail.",
    )
    from gateway.telemetry import report

    report.add_arguments(r)
    r.set_defaults(func=cmd_report)

    from gateway.security.cli import add_key_commands

    add_key_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmgw report ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet
        return 141  # 128 + SIGPIPE, as a shell reports a program the pipe stopped


if __name__ == "__main__":
    raise SystemExit(main())
