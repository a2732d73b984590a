"""The README, run as a newcomer runs it: every shell and Python block in order, verbatim, against the
demo that its own `make run` block starts.

Directives in HTML comments just above a block (invisible on the rendered page):
  <!-- readme-test: server -->            start this block in the background and wait until it answers
  <!-- readme-test: skip (why) -->        shown, not run
  <!-- readme-test: file NAME -->         write the block to NAME in the working directory
The only liberty taken: the README's port 8080 is replaced by a free one (given to make as PORT), so the
test runs beside anything else. It runs in a scratch directory whose entries link to the checkout's, so
the files the README makes (access.log, gateway.yaml) land there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from harness import free_port

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(
    r"(?:<!-- readme-test: (?P<directive>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S
)
RUN_LANGS = ("bash", "python")
# What some blocks must print (doctest style): block text fragment -> expected output fragment
EXPECT = {
    "chat.completions.create(model='demo-chat'": "sim-",
    '"stream":true': "data: [DONE]",
    "grep -i -E 'server-timing|x-gateway'": "x-gateway",
    "class Pet(BaseModel)": "get_weather",
    "llmgw report access.log": "demo-chat",
    "llmgw check-config gateway.yaml": "config OK",
}


@dataclass
class Block:
    lang: str
    body: str
    directive: str


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [Block(m["lang"], m["body"], (m["directive"] or "").strip()) for m in FENCE.finditer(text)]


def scratch_checkout(tmp: Path) -> Path:
    work = tmp / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("access.log", "gateway.yaml", ".git"):
            (work / entry.name).symlink_to(entry)
    return work


def test_every_readme_block_runs_verbatim(tmp_path):
    blocks = readme_blocks()
    assert sum(b.lang in RUN_LANGS and not b.directive.startswith("skip") for b in blocks) >= 6
    assert [b.directive for b in blocks].count("server") == 1
    stamp = ROOT / ".venv" / ".installed-run"
    # `make run` in the scratch directory must find the gateway installed, or it would install it from there
    assert stamp.exists() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime, (
        "install first: `make setup` (or run this test through `make test`)"
    )
    work = scratch_checkout(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "MAKE", "MFLAGS"))}
    env["PORT"] = str(port)  # `make run` takes PORT from the environment as from its command line
    exports: list[str] = []
    server: subprocess.Popen | None = None
    server_log = tmp_path / "server.log"
    try:
        for i, block in enumerate(blocks):
            body = block.body.replace("8080", str(port))
            where = f"README block {i} ({block.lang}):\n{block.body}"
            if block.directive.startswith("skip") or block.lang not in RUN_LANGS + ("yaml",):
                continue
            if block.directive.startswith("file "):
                (work / block.directive.removeprefix("file ").strip()).write_text(body)
                continue
            if block.directive == "server":
                t0 = time.monotonic()
                with open(server_log, "wb") as log:
                    server = subprocess.Popen(
                        ["bash", "-c", body],
                        cwd=work,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                _wait_ready(port, server, server_log, where)
                print(f"`make run` answered after {time.monotonic() - t0:.1f} s")
                continue
            script = (
                body if block.lang == "bash" else f".venv/bin/python - <<'README_PY'\n{body}\nREADME_PY\n"
            )
            t0 = time.monotonic()
            out = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", "\n".join([*exports, script])],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, (
                f"{where}\nexit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            )
            for fragment, expected in EXPECT.items():
                if fragment in block.body:
                    assert expected in out.stdout, f"{where}\nexpected {expected!r} in:\n{out.stdout[-2000:]}"
            if "llmgw report access.log" in block.body:  # the README promises the causes of the tail, at once
                assert re.search(r"^Tail: [1-9]", out.stdout, re.M), f"{where}: an empty tail:\n{out.stdout}"
            print(f"block {i}: {time.monotonic() - t0:.1f} s")
            exports += [line for line in body.splitlines() if line.startswith("export ")]
        assert server is not None
        log = (work / "access.log").read_text().splitlines()
        assert len(log) >= 5 and all(line.startswith("{") for line in log)  # the file the README names
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    assert "Traceback" not in server_log.read_text()


def _wait_ready(port: int, server: subprocess.Popen, log: Path, where: str) -> None:
    deadline = time.monotonic() + 300  # a fresh clone installs first
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"{where}\nexited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{where}\nnot ready after 300 s:\n{log.read_text()[-3000:]}")
