"""e2e harness: real gateway processes (uvicorn on a real port), real simulated providers, real Redis.

Tests talk to the gateway with the real openai SDK and ask the simulators what they saw; the only
gateway-side facts they read are its public outputs (responses, headers, access log, /metrics).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import yaml
from openai import DefaultHttpxClient, OpenAI

from gateway.sim.profile import SimProfile
from gateway.sim.runner import SimThread

REDIS_URL = "redis://127.0.0.1:6379/0"


def shared_state(prefix: str, **extra: Any) -> dict[str, Any]:
    """A ``state`` block: the test Redis under ``prefix``, replicas syncing every 100 ms (plus ``extra``)."""
    return {
        "backend": "redis",
        "redis_url": REDIS_URL,
        "key_prefix": prefix,
        "sync_interval_ms": 100,
        **extra,
    }


# The interpreter the Gateway class runs gateways with: this one (the source tree), or the one
# LLMGW_GATEWAY_PYTHON names (`make test-compiled`: the compiled build's venv). That one runs from the
# test's directory, so that `-m gateway` imports its installed package rather than this tree's.
# (abspath, not resolve: a venv's python is a symlink to the interpreter it was made from, which has no venv)
OTHER_GATEWAY_PYTHON = os.environ.get("LLMGW_GATEWAY_PYTHON")
GATEWAY_PYTHON = os.path.abspath(OTHER_GATEWAY_PYTHON) if OTHER_GATEWAY_PYTHON else sys.executable

T = TypeVar("T")

# A structured-output schema: the simulator charges its cold compile (cold_schema_ms) on a deployment's
# first request with it, which warm-up is there to pay before users do.
TURN_SCHEMA = {
    "name": "turn",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"intent": {"type": "string"}},
        "required": ["intent"],
        "additionalProperties": False,
    },
}

# One client for the whole run: building an httpx client per request (SSL context and all) costs tens of
# milliseconds on these machines and would pollute every timing a test measures.
HTTP = httpx.Client(timeout=30)
# One TLS context for the clients tests build: each new client (httpx.get() and the like make one per call, the
# SDK one per OpenAI()) loads the CA bundle into a context of its own, 30-90 ms here, hundreds of times a run.
# The tests' requests are plain HTTP; a test of TLS passes the context it needs.
TLS = httpx.create_ssl_context()
# What httpx.get() and the like do, each request on a connection of its own closed after its response, with
# no client built per call.
FRESH = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0, max_connections=None), verify=TLS)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed out from 10,000-19,999: below the kernel's ephemeral range, so an outgoing connection of
# this run can never take one between free_port() and the server's bind, and 10,000 below it too, where
# a Redis Cluster node on one of them puts its bus port (port + 10,000: 20,000-29,999, never handed out).
# A random start keeps two runs on one machine apart.
_PORT_LOW, _PORT_HIGH = 10_000, 20_000
_OWN_RANGE = _ephemeral_low() >= _PORT_HIGH + 10_000
_next_port = itertools.count(random.randrange(_PORT_LOW, _PORT_HIGH))


def free_port() -> int:
    """A loopback port nothing listens on, which only this run hands out."""
    if _OWN_RANGE:
        for _ in range(_PORT_HIGH - _PORT_LOW):
            port = _PORT_LOW + (next(_next_port) - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use (another run, or a server of this one)
                return port
    with socket.socket() as s:  # an ephemeral range that starts low: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, cond: Callable[[], T], timeout: float = 20.0, every: float = 0.05) -> T:
    """Poll ``cond`` until it returns something true, and return that; fail naming ``what`` after ``timeout`` s.

    Timeouts are generous: a test waits for an event, not within a window, however busy the machine.
    """
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def stop_process(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Ask a process to stop with ``sig``; kill it if it has not within ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes (spawned children running spawn_main, not the resource tracker)."""
    pids = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            pids.append(int(child))
    return pids


def self_signed_cert(d: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 in ``d``: (certificate, key).

    Clients trust it only through the certificate file (a deployment's ``ca_file``), as with a private CA.
    """
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Sims:
    """Simulated providers running in a background thread of the test process."""

    def __init__(self, specs: dict[str, tuple[str, dict[str, Any]]], seed: int | None = None) -> None:
        profiles = []
        for name, (region, knobs) in specs.items():
            p = SimProfile()
            p.update(knobs)
            profiles.append((name, region, p))
        self._thread = SimThread(profiles, seed=seed)
        self.ports = self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def base_url(self, name: str) -> str:
        return self.url(name) + "/v1"

    def stats(self, name: str) -> dict[str, Any]:
        # One connection per read, closed after it: tests that count a sim's connections then know that
        # each read adds exactly one, whether or not a pooled keep-alive would have survived the sim's idle timer.
        return HTTP.get(self.url(name) + "/sim/stats", headers={"connection": "close"}, timeout=5).json()

    def set(self, name: str, **knobs: Any) -> None:
        r = HTTP.post(self.url(name) + "/sim/profile", json=knobs, timeout=5)
        assert r.status_code == 200, r.text

    def reset(self, name: str) -> None:
        HTTP.post(self.url(name) + "/sim/reset", timeout=5)

    def renew(self, name: str, **knobs: Any) -> None:
        """The simulator as if new, for the next test of a module that shares it: every knob at its default
        but ``knobs``, its counters at zero."""
        self.set(name, **{**SimProfile().to_dict(), **knobs})
        self.reset(name)

    def stop(self) -> None:
        self._thread.stop()


class SdkHttp(DefaultHttpxClient):
    """An OpenAI SDK client's HTTP client as the SDK builds its own (its defaults, closed when it is dropped),
    on the run's TLS context."""

    def __del__(self) -> None:
        if not self.is_closed:
            with contextlib.suppress(Exception):
                self.close()


class Gateway:
    """One `llmgw serve` process with its own config, port and access log."""

    def __init__(
        self,
        cfg: dict[str, Any],
        tmp: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
        wait_ready: bool = True,
        name: str = "gw",
        stock_uvicorn: str | None = None,
    ) -> None:
        """``stock_uvicorn`` ("h11" or "httptools") serves the app with plain uvicorn and that HTTP protocol
        instead of `llmgw serve`, as a user embedding the ASGI app elsewhere would."""
        reap()
        self.port = free_port()
        self.log_path = tmp / f"{name}-{self.port}-access.jsonl"
        cfg = dict(cfg)
        cfg.setdefault("server", {})
        cfg["server"] = {"host": "127.0.0.1", "drain_timeout_s": 5, **cfg["server"], "port": self.port}
        if (
            cfg["server"].get("admin_port") == "auto"
        ):  # a port of its own, for configs shared by several gateways
            cfg["server"]["admin_port"] = free_port()
        cfg["access_log"] = {"path": str(self.log_path), "format": "json", **cfg.get("access_log", {})}
        self.config_path = tmp / f"{name}-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.stderr_path = tmp / f"{name}-{self.port}.stderr"
        full_env = {**os.environ, **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config_path),
            "--log-level",
            "warning",
        ]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        if stock_uvicorn is not None:
            full_env["LLMGW_CONFIG"] = str(self.config_path)
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "gateway.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--http",
                stock_uvicorn,
                "--log-level",
                "warning",
            ]
        cmd[0] = GATEWAY_PYTHON
        cwd = tmp if OTHER_GATEWAY_PYTHON else None
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=self._stderr, env=full_env, cwd=cwd
        )
        self.url = f"http://127.0.0.1:{self.port}"
        admin_port = cfg["server"].get("admin_port")
        # probes and /metrics live on server.admin_port when it is set
        self.admin_url = f"http://127.0.0.1:{admin_port}" if admin_port else self.url
        if wait_ready:
            try:
                self.wait_ready(ready_timeout)
            except BaseException:  # no fixture holds it yet: stop it here, or it serves on after the tests
                self.stop()
                raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if HTTP.get(self.admin_url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-4000:]
        except OSError:
            return ""

    def client(self, **kw: Any) -> Any:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        kw.setdefault("http_client", SdkHttp(timeout=kw["timeout"], verify=TLS))
        return OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "test-key"), **kw)

    def records(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Access-log records written so far (waits until at least ``wait_for`` are there)."""
        end = time.monotonic() + timeout
        while True:
            recs = [orjson.loads(line) for line in self._whole_lines() if line.strip()]
            if len(recs) >= wait_for or time.monotonic() > end:
                return recs
            time.sleep(0.05)

    def lines(self, wait_for: int = 0, timeout: float = 5.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            lines = [line.decode() for line in self._whole_lines()]
            if len(lines) >= wait_for or time.monotonic() > end:
                return lines

            time.sleep(0.05)

    def _whole_lines(self) -> list[bytes]:
        """The access log's lines, less one still being written: a read can see part of a write (the page cache
        takes a line a page at a time), and half a line is no record yet."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        return data[: data.rfind(b"\n") + 1].splitlines()

    def fence(self) -> int:
        """How many records there are once every earlier request's is in: a request sent now on a connection of
        its own (the fence, an unknown path) is waited for in the log, and one worker writes its log in order,
        so a record an earlier request still had to write is in by then (a response reaches its client a
        moment before its record is written). The count includes the fence's own record."""
        path = f"/fence-{time.monotonic_ns()}"
        assert FRESH.get(self.url + path, timeout=10).status_code == 404

        def fenced() -> list[dict[str, Any]] | None:
            recs = self.records()
            return recs if any(r["path"] == path for r in recs) else None

        return len(wait_until("the fence's record", fenced))

    def metrics(self) -> str:
        return HTTP.get(self.admin_url + "/metrics", timeout=5).text

    def assert_no_tracebacks(self) -> None:
        """Nothing the gateway printed is a crash: no traceback, no error of uvicorn's around the app."""
        err = self.stderr()
        assert "Traceback" not in err and "Exception in ASGI application" not in err, err

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        stop_process(self.proc, timeout, sig)
        self._stderr.close()
        return self.proc.returncode

    def stop_soon(self, timeout: float = 15.0) -> None:
        """Ask the gateway to stop (SIGTERM) and go on without waiting for it to exit, for a test's end that
        needs no exit code: its shutdown idles through uvicorn's ticks (~0.2 s) that the next test need not
        wait out. reap() finishes the job, killing it if it is still there ``timeout`` s later."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self._kill_after = time.monotonic() + timeout
        _STOPPING.append(self)


# Gateways asked to stop by Gateway.stop_soon(), until reap() has seen them exit.
_STOPPING: list[Gateway] = []


def reap(wait: bool = False) -> None:
    """Forget the gateways stop_soon() asked to stop that have exited, and kill those still running past
    their timeout; with ``wait``, first wait for each until its timeout (the run's end)."""
    for gw in list(_STOPPING):
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                gw.proc.wait(max(0.0, gw._kill_after - time.monotonic()))
        if gw.proc.poll() is None and time.monotonic() >= gw._kill_after:
            gw.proc.kill()
            gw.proc.wait()
        if gw.proc.poll() is not None:
            gw._stderr.close()
            _STOPPING.remove(gw)


class LogFrom:
    """A gateway that a module's tests share, as one of them sees it: ``records()`` holds only the records of
    requests sent since it was made (see Gateway.fence); everything else is the gateway's own."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._start = gw.fence()

    def records(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        return self._gw.records(self._start + wait_for, timeout)[self._start :]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gw, name)


def plain_gateway(tmp: Path, profile: dict[str, Any]) -> Iterator[tuple[Sims, Gateway]]:
    """For a module-scoped fixture (``yield from``): one simulator ("sim-a") with ``profile`` and a gateway
    with the default settings over it (model "chat"), stopped when the module is done."""
    sims = Sims({"sim-a": ("us-east", profile)})
    gw = Gateway({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]}, tmp, name="plain")
    yield sims, gw
    gw.stop()
    sims.stop()


def model(name: str, deployments: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "deployments": deployments, **extra}


def dep(id: str, base_url: str, region: str = "us-east", **extra: Any) -> dict[str, Any]:
    return {
        "id": id,
        "base_url": base_url,
        "api_key": "sim-key",
        "model": "sim-large",
        "region": region,
        **extra,
    }


def priority_model(
    name: str, deployments: list[dict[str, Any]], routing: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A model whose deployments are tried in the order given (priority routing, each ranked by its place)."""
    ranked = [{**d, "priority": rank} for rank, d in enumerate(deployments)]
    return model(name, ranked, routing={"strategy": "priority", **(routing or {})}, **extra)


def required_warmup_config(base_url: str, timeout_ms: int) -> dict[str, Any]:
    """Model chat on one deployment whose warm-up of TURN_SCHEMA must pass before the gateway is ready."""
    warmup = {"schemas": [TURN_SCHEMA], "required": True, "timeout_ms": timeout_ms}
    return {"models": [model("chat", [dep("a", base_url)], warmup=warmup)]}


def dead_model(name: str = "dead") -> dict[str, Any]:
    """A model whose one deployment is a port nothing listens on, not tried at start-up nor retried."""
    pool = {"min_connections": 0, "validate_on_start": False}
    return model(
        name, [dep("nowhere", f"http://127.0.0.1:{free_port()}/v1", pool=pool)], retry={"max_retries": 0}
    )


def post_chat(
    gw: Gateway,
    model_name: str = "chat",
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    **body: Any,
) -> httpx.Response:
    """A chat completion request over plain HTTP (no SDK, no retries): the response as the gateway gave it."""
    return HTTP.post(
        gw.url + "/v1/chat/completions",
        headers=headers or {},
        timeout=timeout,
        json={"model": model_name, "stream": stream, "messages": [{"role": "user", "content": "x"}], **body},
    )


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


class TinyProxy:
    """A real forward proxy (Debian's tinyproxy) on a free port, with basic auth; its log says what it relayed."""

    def __init__(self, tmp: Path, user: str, password: str) -> None:
        self.port = free_port()
        self.log_path = tmp / f"tinyproxy-{self.port}.log"
        conf = tmp / f"tinyproxy-{self.port}.conf"
        conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nAllow 127.0.0.1\n"
            f'BasicAuth {user} {password}\nLogFile "{self.log_path}"\nLogLevel Info\n'
            "DisableViaHeader Yes\n"
        )
        self.proc = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"tinyproxy did not start: {self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc, 5)
