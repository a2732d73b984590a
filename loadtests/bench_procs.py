"""Processes for loadtests/bench.py: start, wait for readiness, stop, and account CPU/RSS from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ /proc accounting


@dataclass(frozen=True, slots=True)
class ProcStat:
    ppid: int
    cpu_ticks: int  # utime + stime of the process itself (all its threads)
    sys_ticks: int  # of which stime: time in the kernel on its behalf (system calls, the network stack)
    reaped_ticks: int  # cutime + cstime: children it has waited for
    reaped_sys_ticks: int  # of which cstime
    rss_pages: int


def proc_stat(pid: int) -> ProcStat:
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces
    utime, stime, cutime, cstime = (int(v) for v in f[11:15])
    return ProcStat(int(f[1]), utime + stime, stime, cutime + cstime, cstime, int(f[21]))


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(proc_stat(int(name)).ppid, []).append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_s: float  # CPU seconds of the live tree, plus the root's reaped children
    sys_s: float  # of which in the kernel
    rss_bytes: int


def tree_usage(root: int) -> Usage:
    ticks = sys_ticks = rss = 0
    for pid in process_tree(root):
        try:
            st = proc_stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        ticks += st.cpu_ticks + (st.reaped_ticks if pid == root else 0)
        sys_ticks += st.sys_ticks + (st.reaped_sys_ticks if pid == root else 0)
        rss += st.rss_pages * PAGE_SIZE
    return Usage(ticks / CLK_TCK, sys_ticks / CLK_TCK, rss)


# ------------------------------------------------------------------ HTTP helpers (stdlib, loopback only)


def http_get(url: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return None, b""


def http_post(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=b"", method="POST"), timeout=timeout
        ) as r:
            return r.status
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ services


class Service:
    """One long-running process of the benchmark (mock, proxy), in its own session, output to a log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        *,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self._proc.pid  # taskset execs, so this is the service itself

    def alive(self) -> bool:
        return self._proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout_s: float) -> float:
        """Poll url until it answers below 500; seconds it took. Raises if the process dies or time runs out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.tail()}")
            status, _ = http_get(url, 1.0)
            if status is not None and status < 500:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s at {url}:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for what is left of this service's own process group (its session)."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # started with start_new_session: the group id is our pid
        except OSError:
            pass
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
