"""`llmgw` as a newcomer meets it: help everywhere, config problems all at once, keys that cannot get lost,
errors that say what happened."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import redis
import yaml
from harness import REDIS_URL, dead_model, free_port

from gateway.cli import build_parser
from gateway.cli import main as cli_main
from gateway.security.keys import hash_key


def llmgw(*args: str) -> subprocess.CompletedProcess:
    """`llmgw ...` in this process (the same entry point, no interpreter start-up per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def write(tmp_path: Path, cfg: dict, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


CHAT = {"name": "chat", "deployments": [{"id": "a", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}


def test_every_command_and_option_has_help():
    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, child in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{where} {name}")
                    if not child.description:
                        missing.append(f"{where} {name} (description)")
                    missing += walk(child, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(build_parser(), "llmgw") == []
    for cmd in (["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["keys", "hash"], ["warmup"]):
        out = llmgw(*cmd, "--help")
        assert out.returncode == 0 and "usage: llmgw " + " ".join(cmd) in out.stdout and len(out.stdout) > 200


def test_keys_refuse_a_config_whose_state_cannot_hold_keys(tmp_path, redis_prefix):
    memory = write(tmp_path, {"state": {"backend": "memory", "key_prefix": redis_prefix}, "models": [CHAT]})
    for cmd in (["create", "--id", "svc"], ["list"], ["revoke", "--id", "svc"]):
        out = llmgw("keys", cmd[0], "-c", memory, *cmd[1:])
        assert out.returncode == 2 and "state.backend is 'memory'" in out.stderr, out
        assert out.stdout == ""  # no key printed
    no_redis_keys = write(
        tmp_path,
        {
            "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix},
            "auth": {"mode": "keys", "redis_keys": False},
            "models": [CHAT],
        },
        "b.yaml",
    )
    out = llmgw("keys", "create", "-c", no_redis_keys, "--id", "svc")
    assert out.returncode == 2 and "auth.redis_keys is false" in out.stderr
    assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=redis_prefix + "*")) == []
    # a config whose gateways do read Redis keys works
    shared = write(
        tmp_path,
        {
            "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix},
            "auth": {"mode": "keys"},
            "models": [CHAT],
        },
        "c.yaml",
    )
    made = llmgw("keys", "create", "-c", shared, "--id", "svc")
    assert made.returncode == 0 and made.stdout.strip().startswith("sk-gw-")
    assert "svc" in llmgw("keys", "list", "-c", shared).stdout
    assert llmgw("keys", "revoke", "-c", shared, "--id", "svc").returncode == 0


def test_keys_create_refuses_an_id_the_config_already_gives_a_key(tmp_path, redis_prefix):
    # two keys under one id would share their access-log name, metrics and rate-limit state
    listed = {"id": "svc", "hash": hash_key("sk-gw-listed")}
    cfg = write(
        tmp_path,
        {
            "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix},
            "auth": {"mode": "keys", "keys": [listed]},
            "models": [CHAT],
        },
    )
    out = llmgw("keys", "create", "-c", cfg, "--id", "svc")
    assert out.returncode == 2 and "lists a key with id 'svc' under auth.keys" in out.stderr, out
    assert out.stdout == ""  # no key printed
    assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=redis_prefix + "*")) == []
    other = llmgw("keys", "create", "-c", cfg, "--id", "svc-2")
    assert other.returncode == 0 and other.stdout.strip().startswith("sk-gw-")
    # an id goes into the access log, metric labels and Redis keys as it is
    spaced = llmgw("keys", "create", "-c", cfg, "--id", "svc 3\nx")
    assert spaced.returncode == 2 and "--id 'svc 3\\nx': must be 1-128 visible ASCII" in spaced.stderr, spaced
    assert spaced.stdout == ""


def test_check_config_reports_every_problem_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("FF_UNSET_A", raising=False)
    monkeypatch.delenv("FF_UNSET_B", raising=False)
    cfg = {
        "server": {"port": "eighty"},
        "state": {"backend": "disk"},
        "models": [
            {
                "name": "chat",
                "deployments": [
                    {"id": "a", "base_url": "${FF_UNSET_A}", "api_key": "${FF_UNSET_B}", "model": "m"}
                ],
            }
        ],
    }
    out = llmgw("check-config", write(tmp_path, cfg))
    assert out.returncode == 2
    for expected in (
        "models[0].deployments[0].base_url: environment variable FF_UNSET_A is not set",
        "models[0].deployments[0].api_key: environment variable FF_UNSET_B is not set",
        "server.port:",
        "state.backend:",
    ):
        assert expected in out.stderr, out.stderr
    assert out.stderr.count("base_url") == 1  # reported as unset, not again as an invalid URL


# What start-up says of a port without keys: who can reach it, and what keeps web pages out (or does not).
OPEN_PORT = "listening on 0.0.0.0 without API keys (auth.mode: none): anyone who can reach it can spend your"
HOSTS_GUARD = (
    "server.allowed_hosts is what keeps web pages out (DNS rebinding: a page pointing its own name at this "
    "address): only requests sent to an IP address, localhost or a name listed there are answered. List "
    'there the names clients call it by, never "*".'
)
ANY_HOST = 'server.allowed_hosts "*" lets any web page reach it too'
LOCAL_ANY_HOST = (
    'server.allowed_hosts "*" with auth.mode none: any web page opened in a browser on this machine can '
    "reach the gateway by pointing its own name at 127.0.0.1 (DNS rebinding)"
)


def test_check_config_warns_about_a_port_without_auth_that_others_or_web_pages_reach(tmp_path):
    def warned(server: dict, auth: str = "none") -> str:
        out = llmgw(
            "check-config", write(tmp_path, {"server": server, "auth": {"mode": auth}, "models": [CHAT]})
        )
        assert out.returncode == 0 and "config OK" in out.stdout, out
        return out.stderr

    err = warned({"host": "0.0.0.0"})
    assert f"warning: {OPEN_PORT}" in err and HOSTS_GUARD in err and ANY_HOST not in err, err
    err = warned({"host": "0.0.0.0", "allowed_hosts": ["gw.internal", "*"]})
    assert f"warning: {OPEN_PORT}" in err and ANY_HOST in err and "never" not in err, err
    err = warned({"host": "127.0.0.1", "allowed_hosts": ["*"]})
    assert f"warning: {LOCAL_ANY_HOST}" in err and "listening on" not in err, err
    assert warned({"host": "0.0.0.0", "allowed_hosts": ["*"]}, auth="keys") == ""
    assert warned({"host": "127.0.0.1", "allowed_hosts": ["gw.internal"]}) == ""


def _logged_warnings(stderr: str) -> list[str]:
    """The messages of the gateway's WARNING log lines (JSON, one a line) in ``stderr``."""
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line["message"] for line in lines if line["level"] == "WARNING"]


def test_serve_on_an_open_address_without_keys_says_what_keeps_web_pages_out(tmp_path):
    """As the operator sees it: the warning comes first, before the port is even tried (here it is taken
    on 127.0.0.1, so nothing ever listens on 0.0.0.0)."""
    cfg = write(tmp_path, {"models": [CHAT]})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "-c", cfg, "--host", "0.0.0.0", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1, out.stderr
    (warning,) = _logged_warnings(out.stderr)
    assert warning.startswith(OPEN_PORT) and HOSTS_GUARD in warning, warning
    assert out.stderr.strip().splitlines()[-1].startswith(f"llmgw: cannot listen on 0.0.0.0:{port}: ")


def test_serve_on_loopback_with_any_host_allowed_and_no_keys_warns_of_dns_rebinding(gateways):
    gw = gateways({"server": {"allowed_hosts": ["*"]}, "models": [dead_model()]})
    assert any(w.startswith(LOCAL_ANY_HOST) for w in _logged_warnings(gw.stderr())), gw.stderr()


def test_warmup_connect_error_names_the_url_not_ssl(tmp_path):
    port = free_port()  # closed: nothing listens there
    cfg = {
        "models": [
            {
                "name": "chat",
                "deployments": [{"id": "a", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m"}],
                "warmup": {
                    "schemas": [{"name": "s", "strict": True, "schema": {"type": "object"}}],
                    "required": True,
                    "timeout_ms": 3000,
                },
            }
        ]
    }
    out = llmgw("warmup", "-c", write(tmp_path, cfg), "--no-learned")
    assert out.returncode == 1
    assert f"cannot connect to http://127.0.0.1:{port}/v1: Connection refused" in out.stdout, out.stdout
    assert "ssl:" not in out.stdout


def test_serve_on_a_port_in_use_says_so_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in out.stderr
    assert "Traceback" not in out.stderr and "demo" not in out.stderr  # nothing was started


def test_serve_refuses_out_of_range_workers_and_ports_before_starting_anything():
    # --workers -2 once started a supervisor with no worker (every request hung); 1000 forked until the
    # machine ran out of memory. The flags take the range of the config keys they override.
    for flag, value, why in (
        ("--workers", "-2", "-2 is out of range (1 to 256)"),
        ("--workers", "0", "0 is out of range (1 to 256)"),
        ("--workers", "257", "257 is out of range (1 to 256)"),
        ("--port", "99999", "99999 is out of range (0 to 65535)"),
        ("--port", "http", "'http' is not a whole number"),
    ):
        out = llmgw("serve", flag, value)
        assert out.returncode == 2, (flag, value, out.stderr)
        assert f"argument {flag}: {why}" in out.stderr
        assert "Traceback" not in out.stderr


def test_serve_names_an_unknown_upstream_client_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLMGW_UPSTREAM_CLIENT": "bogus"},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "llmgw: LLMGW_UPSTREAM_CLIENT='bogus': unknown upstream client (one of h1, httpx)"
    )
    assert "Traceback" not in out.stderr and "serving the embedded demo" not in out.stderr  # nothing started


def test_make_test_brings_its_own_redis_when_none_answers():
    """tests/with_redis.py (what `make test` runs pytest with), on a port where nothing answers."""
    port = free_port()
    script = Path(__file__).resolve().parents[1] / "with_redis.py"
    probe = [sys.executable, "-c", f"import redis; print(redis.Redis(port={port}).ping())"]
    out = subprocess.run(
        [sys.executable, str(script), *probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WITH_REDIS_PORT": str(port)},
    )
    assert out.returncode == 0, out.stderr
    assert f"no Redis answered on 127.0.0.1:{port}: starting" in out.stdout and "True" in out.stdout
    assert f"stopped the redis-server started for this run on 127.0.0.1:{port}" in out.stdout
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # gone with the command
    failing = subprocess.run(
        [sys.executable, str(script), sys.executable, "-c", "raise SystemExit(3)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WITH_REDIS_PORT": str(port)},
    )
    assert failing.returncode == 3  # the command's exit code is make's


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`llmgw check-config -v gw.yaml | head -3`: the reader leaves early; no BrokenPipe traceback."""
    cfg = write(tmp_path, {"models": [CHAT]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "check-config", "-v", cfg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written (start-up takes longer)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
