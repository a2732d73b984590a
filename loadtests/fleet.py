"""Simulated providers and gateways as separate processes, for the hedging and routing benchmarks.

Each simulator and each gateway is its own process (``python -m gateway sim|serve``), so the load
generator's event loop never shares a GIL with what it measures.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from openloop import StreamResult, poisson_schedule, run_open_loop

HTTP = httpx.Client(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Proc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if HTTP.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass(slots=True)
class Fleet:
    """Every process a benchmark started, stopped together; ``tmp`` holds configs, logs and stderr."""

    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llmgw-bench-")))
    procs: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, port: int, cmd: list[str]) -> Proc:
        err = self.tmp / f"{name}.stderr"
        with open(err, "wb") as fh:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
        proc = Proc(name, port, p, err)
        self.procs.append(proc)
        return proc

    def sim(self, name: str, region: str, seed: int, **knobs: Any) -> Proc:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "sim",
            "--port",
            str(port),
            "--name",
            name,
            "--region",
            region,
            "--seed",
            str(seed),
        ]
        for k, v in knobs.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        return self._spawn(name, port, cmd)

    def gateway(self, name: str, cfg: dict[str, Any]) -> tuple[Proc, Path]:
        """A gateway with ``cfg`` (port and JSON access log filled in); returns it and its access log path."""
        port = free_port()
        log = self.tmp / f"{name}-access.jsonl"
        cfg = {
            **cfg,
            "server": {"host": "127.0.0.1", **cfg.get("server", {}), "port": port},
            "access_log": {"path": str(log), "format": "json"},
        }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "warning"]
        return self._spawn(name, port, cmd), log

    def wait_ready(self) -> None:
        for p in self.procs:
            p.wait_ready("/readyz" if p.name.startswith("gw") else "/sim/stats")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def sim_stats(sim: Proc) -> dict[str, Any]:
    return HTTP.get(sim.url + "/sim/stats").json()


def sim_reset(sim: Proc) -> None:
    HTTP.post(sim.url + "/sim/reset")


class SimRecorder:
    """Polls simulators' ``recent`` lists (their last 500 requests) often enough to keep every request's
    record: what each upstream attempt sampled as its TTFT, when it started, sent its first byte, ended."""

    def __init__(self, sims: list[Proc], interval_s: float = 8.0) -> None:
        self.sims = sims
        self.interval_s = interval_s
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self._http = httpx.Client(timeout=5)  # its own: this runs in a thread of its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-recorder", daemon=True)

    def _poll(self) -> None:
        for s in self.sims:
            for r in self._http.get(s.url + "/sim/stats").json()["recent"]:
                self.records[(s.name, r["serial"])] = {**r, "sim": s.name}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def by_request(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.records.values():
            out.setdefault(r["request_id"], []).append(r)
        return out


def upstream_requests(stats: dict[str, Any]) -> int:
    """Generation requests the simulator received: answered, cancelled, or failed on purpose."""
    c = stats["cancelled"]
    return (
        stats["served"]["chat"]
        + c["before_first_byte"]
        + c["mid_stream"]
        + stats["stalled"]
        + stats["resets"]
        + sum(stats["errors_injected"].values())
    )


def access_records(path: Path, prefix: str, timeout: float = 10.0, expect: int = 0) -> list[dict[str, Any]]:
    """The access-log records whose request id starts with ``prefix`` (waits until ``expect`` are there)."""
    end = time.monotonic() + timeout
    while True:
        recs = []
        if path.exists():
            for line in path.read_bytes().splitlines():
                if line.strip():
                    rec = orjson.loads(line)
                    if str(rec.get("request_id", "")).startswith(prefix):
                        recs.append(rec)
        if len(recs) >= expect or time.monotonic() > end:
            return recs
        time.sleep(0.1)


def metric_value(base_url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on ``base_url``/metrics whose labels include ``labels``."""
    total = 0.0
    for line in HTTP.get(base_url + "/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def take_lock() -> int:
    """An exclusive flock on ``bench.lock`` in the temp dir, shared with loadtests/bench.py: benchmarks never
    overlap. Returns the fd (held until exit)."""
    fd = os.open(os.path.join(tempfile.gettempdir(), "bench.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    """nproc, CPU model, kernel, Python and the load average: one line for the report."""
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"load average {load}"
    )


async def drive_arms(
    urls: dict[str, str], phase: str, n: int, rate: float, seed: int, tokens: int
) -> dict[str, list[StreamResult]]:
    """One open-loop Poisson stream of ``n`` streaming chats per arm, all arms at the same time.

    Request ids are ``<phase>-<arm>-<i>`` so each arm's access log can be matched to its client results."""
    runs = []
    for i, (arm, url) in enumerate(urls.items()):
        sched = poisson_schedule(n, rate, seed=seed * 1000 + i * 10 + (0 if phase == "w" else 1))
        runs.append(
            run_open_loop(
                url + "/v1/chat/completions", "chat", sched, id_prefix=f"{phase}-{arm}-", max_tokens=tokens
            )
        )
    done = await asyncio.gather(*runs)
    return dict(zip(urls, done, strict=True))


def open_loop_line(rate: float, warmup: int, requests: int, wall_s: float) -> str:
    return (
        f"open loop, Poisson {rate:g} req/s per arm, arms concurrent, {warmup} warm-up + {requests} measured "
        f"streaming requests per arm; wall time {wall_s:.0f} s"
    )


def report_meta(
    tool: str, argv: list[str] | None, machine_at_start: str, provider: str, load: str
) -> dict[str, str]:
    """The header lines every benchmark report starts with: when, how it was run, on what, against what."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": f"loadtests/{tool} " + " ".join(args),
        "machine (start)": machine_at_start,
        "machine (end)": machine(),
        "provider": provider,
        "load": load,
    }


def write_report(out: Path, md: str, payload: dict[str, Any]) -> None:
    """The markdown report and its JSON beside it; the markdown is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(md)
    print(f"written: {out}", file=sys.stderr)


__all__ = [
    "Fleet",
    "Proc",
    "SimRecorder",
    "access_records",
    "cpu_model",
    "drive_arms",
    "free_port",
    "machine",
    "metric_value",
    "open_loop_line",
    "report_meta",
    "sim_reset",
    "sim_stats",
    "take_lock",
    "upstream_requests",
    "write_report",
]
