"""Pure decisions behind the hostile-input limits: JSON cost on the bytes, redaction, header values in
config, the tpm estimate, access-log escaping, which proxy a deployment uses, and which browser origins and
hosts a request may name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.api.headers import (
    SEEN_HOSTS_MAX,
    SINGLE_VALUE,
    OriginPolicy,
    duplicated,
    host_allowed,
    host_policy,
    own_origin,
)
from gateway.api.jsonlimits import JsonLimit, deeper_than, json_over_limit, wide_integer
from gateway.config import ConfigError, parse_config, redact, redact_url
from gateway.security.guard import estimate_tokens
from gateway.telemetry.accesslog import FIELDS, format_text
from gateway.upstream.proxy import bypassed, proxy_for


def over(raw: bytes, elements: int = 1000, containers: int = 100) -> JsonLimit | None:
    return json_over_limit(raw, elements, containers)[0]


def test_an_ordinary_body_is_decided_by_the_upper_bounds():
    assert over(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi, there"}]})) is None


def test_many_empty_arrays_break_the_container_limit():
    assert over(b'{"x": [' + b",".join([b"[]"] * 101) + b"]}") is JsonLimit.CONTAINERS


def test_many_scalars_break_the_element_limit():
    assert over(b'{"x": [' + b",".join([b"1"] * 1000) + b"]}") is JsonLimit.ELEMENTS
    assert over(b'{"x": [' + b",".join([b"1"] * 990) + b"]}") is None


def test_many_strings_break_the_element_limit_before_any_split():
    assert over(b'{"x": [' + b",".join([b'"a"'] * 1200) + b"]}") is JsonLimit.ELEMENTS


def test_brackets_and_commas_inside_strings_are_not_structure():
    text = 'a [b], {c}, \\" [ { , ' * 200  # escaped quotes do not end the string
    assert over(orjson.dumps({"model": "m", "content": text})) is None
    assert over(orjson.dumps({"k": "\\\\", "x": "[[[[[[[[[[[[[[[[[[[["})) is None  # an escaped backslash


def test_depth_counts_levels_of_nesting():
    def nested(n: int) -> bytes:
        return b'{"a": ' + b"[" * (n - 1) + b"]" * (n - 1) + b"}"

    assert not deeper_than(orjson.loads(nested(8)), 8)
    assert deeper_than(orjson.loads(nested(9)), 8)
    assert not deeper_than({"a": [1, 2, {"b": "c"}]}, 3)


def test_the_container_count_bounds_the_depth_walk():
    raw = b'{"a": "[[[[", "b": [[]]}'
    assert json_over_limit(raw, 1000, 100) == (None, 7)  # an upper bound: the check only needs to be safe
    many = b'{"m": [' + b",".join([b'"[x]"'] * 5000) + b"], " + b'"b": [[]]}'
    assert json_over_limit(many, 100_000, 100) == (None, 4)  # over the bound: counted outside strings


def test_invalid_json_is_left_to_the_parser():
    assert over(b"[" * 20 + b"}" * 20) is None


def _cfg(**deployment) -> dict:
    return {
        "models": [
            {"name": "m", "deployments": [{"id": "d", "base_url": "https://api.example/v1", **deployment}]}
        ]
    }


@pytest.mark.parametrize(
    ("raw", "wide"),
    [
        (b'{"seed": 18446744073709551615, "low": -9223372036854775808}', None),  # the widest that fit
        (b'{"seed": 18446744073709551616}', "18446744073709551616"),
        (b'{"seed": -9223372036854775809}', "-9223372036854775809"),  # 19 digits
        (b'{"seed": -9999999999999999999, "b": 9999999999999999999}', "-9999999999999999999"),
        (b'{"a": [1, 2, 123456789012345678901234567890]}', "123456789012345678901234567890"),
        (b'{"a": "123456789012345678901234567890"}', None),  # in a string: kept as it is
        (b'{"a": "x\\\\", "b": 123456789012345678901234567890}', "123456789012345678901234567890"),
        (b'{"a": "\\"123456789012345678901234567890\\""}', None),  # an escaped quote stays in the string
        (b'{"a": 0.123456789012345678901234567890}', None),  # a float's fraction: a float anyway
        (b'{"a": 1e123456789012345678901}', None),  # an exponent (orjson refuses its value)
        (b'{"a": 123456789012345678901.5}', None),  # a float written as one
        (b'{"a": 1' + b"0" * 5000 + b"}", "1" + "0" * 5000),  # beyond what int() reads: out of range
    ],
)
def test_integers_wider_than_64_bits_are_found_outside_strings(raw, wide):
    assert wide_integer(raw) == wide


def test_a_wide_integer_is_what_orjson_would_round():
    for value in (2**64 - 1, -(2**63)):
        raw = b'{"v": %d}' % value
        assert wide_integer(raw) is None and orjson.dumps(orjson.loads(raw)) == raw.replace(b" ", b"")
    for value in (2**64, -(2**63) - 1):
        raw = b'{"v": %d}' % value
        assert wide_integer(raw) == str(value) and orjson.dumps(orjson.loads(raw)) != raw.replace(b" ", b"")


def test_every_header_value_and_url_secret_is_redacted():
    cfg = parse_config(
        {
            **_cfg(
                api_key="sk-provider",
                headers={"x-upstream-credential": "cred-v4lue", "x-team": "voice"},
                proxy="http://user:pw@proxy.internal:3128",
            ),
            "state": {"redis_url": "redis://:redis-pw@redis:6379/0?password=qs-pw&db=2"},
            "tracing": {"otlp_endpoint": "https://otel-user:otel-pw@collector:4318?token=t0k"},
        },
        env={},
    )
    data = redact(cfg)
    shown = orjson.dumps(data).decode()
    for secret in (
        "sk-provider",
        "cred-v4lue",
        "voice",
        "user:pw",
        "redis-pw",
        "qs-pw",
        "otel-pw",
        "otel-user",
        "t0k",
    ):
        assert secret not in shown, secret
    d = data["models"][0]["deployments"][0]
    assert d["headers"] == {"x-upstream-credential": "***", "x-team": "***"}
    assert d["proxy"] == "http://***@proxy.internal:3128"
    assert data["state"]["redis_url"] == "redis://***@redis:6379/0?password=***&db=2"
    assert data["tracing"]["otlp_endpoint"] == "https://***@collector:4318?token=***"


def test_harmless_query_parameters_stay_readable():
    assert (
        redact_url("https://x.openai.azure.com/openai?api-version=2024-06-01&sig=abc")
        == "https://x.openai.azure.com/openai?api-version=2024-06-01&sig=***"
    )


@pytest.mark.parametrize("value", ["naïve ✓ token", "日本"])
def test_a_header_value_http_cannot_carry_fails_naming_the_key(value):
    with pytest.raises(
        ConfigError,
        match=r"models\[0\]\.deployments\[0\]\.headers: the value of 'x-note' holds "
        r"characters an HTTP header cannot carry",
    ):
        parse_config(_cfg(headers={"x-note": value}), env={})
    assert parse_config(_cfg(headers={"x-note": "café"}), env={})  # latin-1 is fine


def test_check_config_rejects_a_non_latin1_header(tmp_path: Path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_cfg(headers={"x-note": "✓"}), allow_unicode=True))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "models[0].deployments[0].headers: the value of 'x-note'" in out.stderr


def test_a_proxy_setting_must_be_an_http_proxy_url():
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments\[0\]\.proxy: expected http://"):
        parse_config(_cfg(proxy="socks5://p:1080"), env={})


def test_tpm_estimate_counts_every_choice():
    raw = b"x" * 400
    assert estimate_tokens(raw, {"max_tokens": 100}) == 200
    assert estimate_tokens(raw, {"max_tokens": 100, "n": 4}) == 500
    assert estimate_tokens(raw, {"n": 2}) == 100 + 512
    assert estimate_tokens(raw, {"max_tokens": 100, "n": "9"}) == 1000  # as a lenient provider reads it: 9


def test_text_log_escapes_what_could_forge_a_line_or_split_a_field():
    rec = dict.fromkeys(FIELDS)
    rec.update(
        start_time="2026-01-01T00:00:00Z",
        method="GET",
        path='/v1/x\n[forged] "GET / HTTP/1.1" 200',
        response_code=404,
        response_flags="NR",
        bytes_received=0,
        bytes_sent=10,
        duration_ms=1.0,
        user_agent='a" "b\u2028c\x85d\\',
        request_id="r1",
    )
    line = format_text(rec).decode()
    assert line.count("\n") == 1 and line.endswith("\n") and len(line.splitlines()) == 1
    assert '"GET /v1/x\\n[forged] \\"GET / HTTP/1.1\\" 200 HTTP/1.1"' in line
    assert '"a\\" \\"b\\u2028c\\u0085d\\\\"' in line


def test_proxy_from_the_environment_by_scheme_and_no_proxy():
    env = {
        "HTTPS_PROXY": "http://u:p%40ss@proxy:3128",
        "HTTP_PROXY": "plain-proxy:8080",
        "NO_PROXY": ".internal,10.0.0.0/8,localhost:8000",
    }
    r = proxy_for("https://api.openai.com/v1", None, env)
    assert r is not None and (r.host, r.port) == ("proxy", 3128)
    assert r.authorization == "Basic dTpwQHNz"  # u:p@ss
    plain = proxy_for("http://vllm:8000/v1", None, env)
    assert plain is not None and (plain.host, plain.port, plain.authorization) == ("plain-proxy", 8080, None)
    assert proxy_for("https://llm.internal/v1", None, env) is None
    assert proxy_for("http://10.1.2.3/v1", None, env) is None
    assert proxy_for("http://localhost:8000/v1", None, env) is None
    assert proxy_for("http://localhost:9000/v1", None, env) is not None  # another port
    assert proxy_for("https://api.openai.com/v1", "direct", env) is None
    assert proxy_for("https://api.openai.com/v1", None, {}) is None
    own = proxy_for("https://llm.internal/v1", "http://egress:3128", env)  # the config wins over NO_PROXY
    assert own is not None and own.host == "egress"


def test_no_proxy_star_and_suffixes():
    assert bypassed("anything", 443, "*")
    assert bypassed("api.example.com", 443, "example.com") and bypassed("example.com", 443, ".example.com")
    assert not bypassed("badexample.com", 443, "example.com")
    assert not bypassed("api.example.com", 443, None)


@pytest.mark.parametrize("few_quotes", [0, 4096], ids=["split", "spans"])
def test_both_ways_of_cutting_strings_agree(monkeypatch, few_quotes):
    import gateway.api.jsonlimits as jl

    monkeypatch.setattr(jl, "FEW_QUOTES", few_quotes)
    hidden = orjson.dumps(
        {"m": [f'[{{"{i}", \\' for i in range(300)]}
    )  # brackets, commas, escapes in strings
    assert over(hidden) is None
    assert over(hidden[:-1] + b", [" + b"[]," * 100 + b"[]]}") is JsonLimit.CONTAINERS
    escapes = b'{"a": "x\\\\", "b": [' + b'"\\"]",' * 101 + b'"]"]}'  # \\ then a real quote; \\" inside
    assert over(escapes, containers=3) is None
    assert over(escapes.replace(b'"]"]}', b"[], []]}"), containers=3) is JsonLimit.CONTAINERS


def test_marks_counted_part_by_part_give_the_same_answer():
    from gateway.api.jsonlimits import count_marks

    raw = b'{"m": "[[,", "x": [' + b",".join([b"[]"] * 150) + b"]}"
    parts = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    marks = count_marks(parts[0])
    for p in parts[1:]:
        marks = marks.add(count_marks(p))
    assert marks == count_marks(raw)
    assert (
        json_over_limit(raw, 1000, 100, marks)
        == json_over_limit(raw, 1000, 100)
        == (JsonLimit.CONTAINERS, 152)
    )  # { and [ and 150 []


def test_an_unusable_proxy_in_the_environment_is_named_without_its_credentials():
    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: unsupported proxy socks5://p \(expected") as err:
        proxy_for("https://api.openai.com/v1", None, {"HTTPS_PROXY": "socks5://user:secret@p:1080"})
    assert "secret" not in str(err.value)


@pytest.mark.parametrize(
    ("origin", "host", "own"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://127.0.0.1:8443", "127.0.0.1:8443", True),  # behind a TLS proxy at the same address
        ("http://localhost:8080", "LocalHost:8080", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://10.0.0.5", "10.0.0.5", True),  # an address names the gateway itself, whatever it is
        ("http://127.0.0.1:3000", "127.0.0.1:8080", False),  # another local server's page
        ("http://127.0.0.1", "127.0.0.1:8080", False),
        ("http://gw.example:8080", "gw.example:8080", False),  # a name can be rebound to the gateway
        ("http://127.0.0.1.nip.io:8080", "127.0.0.1.nip.io:8080", False),
        # loopback by RFC 6761, as the Host check trusts it: the gateway's own page at that name
        ("http://app.localhost:8080", "app.localhost:8080", True),
        ("http://App.LocalHost.:8080", "app.localhost.:8080", False),  # browsers send origins in lower case
        ("http://app.localhost.:8080", "App.LocalHost.:8080", True),
        ("http://app.localhost:3000", "app.localhost:8080", False),  # another local server's page
        ("http://app.localhost:8080", "localhost:8080", False),  # another origin, even at the same port
        ("http://localhost:8080", "app.localhost:8080", False),
        ("http://localhost.evil.example:8080", "localhost.evil.example:8080", False),
        ("null", "127.0.0.1:8080", False),
        ("file://", "127.0.0.1:8080", False),
        ("ftp://127.0.0.1:8080", "127.0.0.1:8080", False),
        ("http://[::1:8080", "[::1:8080", False),
    ],
)
def test_the_gateways_own_origin_is_an_address_or_localhost_it_was_called_at(origin, host, own):
    assert own_origin(origin, host) is own
    assert OriginPolicy([]).allows(origin, host) is own


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8080",
        "127.0.0.1.:8080",
        "[::1]:8080",
        "[fe80::1]:80",
        "LocalHost:8080",
        "localhost.:8080",
        "app.localhost:3000",
        "a.b.localhost",
        "evil.example:8080",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8080",
        "0x7f.1:8080",
    ],
)
def test_a_page_at_the_host_called_is_own_exactly_when_that_host_needs_no_listing(host):
    """The two checks trust the same names: a page served from a host the Host check answers without
    ``server.allowed_hosts`` may call the gateway there without ``server.cors_origins``, and no other."""
    assert own_origin(f"http://{host.lower()}", host) is host_allowed(host, frozenset())


@pytest.mark.parametrize(
    "host", ["gw.internal:8080", "GW.Internal:8080", "gw.internal", "other.internal:8080"]
)
def test_a_name_in_allowed_hosts_is_own_as_the_host_check_takes_it(host):
    """The operator's names are trusted by both checks alike: a page the gateway serves at such a name
    (its docs) may call it there; a name it does not list is still another origin."""
    names = frozenset({"gw.internal"})
    assert own_origin(f"http://{host.lower()}", host, names) is host_allowed(host, names)
    assert OriginPolicy([], ["gw.internal", "*"]).allows(f"http://{host.lower()}", host) is host_allowed(
        host, names
    )
    assert not OriginPolicy([], ["gw.internal"]).allows("http://gw.internal:8080", "gw.internal:9090")
    assert not OriginPolicy([], ["*"]).allows("http://gw.internal:8080", "gw.internal:8080")  # "*" names none


def test_listed_origins_are_matched_exactly_and_star_allows_any():
    policy = OriginPolicy(["https://App.example/", "http://localhost:3000"])
    assert policy.allows("https://app.example", None) and policy.allows("http://localhost:3000", "x")
    assert not policy.allows("https://app.example.evil", None) and not policy.allows("null", None)
    assert not policy.allows("https://evil.example", "evil.example")
    assert OriginPolicy(["*"]).allows("null", None)


def test_only_single_value_headers_given_twice_are_duplicates():
    assert duplicated([(b"accept", b"a"), (b"accept", b"b"), (b"x-a", b"1"), (b"x-a", b"2")]) is None
    assert duplicated([(b"host", b"a"), (b"api-key", b"k"), (b"api-key", b"k")]) == "api-key"
    assert duplicated([(b"content-type", b"a"), (b"host", b"a"), (b"host", b"b")]) == "host"
    assert duplicated([(b"x-gateway-hedge", b"off"), (b"x-gateway-hedge", b"50")]) == "x-gateway-hedge"
    assert duplicated([(name, b"v") for name in sorted(SINGLE_VALUE)]) is None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("10.1.2.3:9090", True),  # a pod's address: kubelet probes, Prometheus scrapes
        ("0.0.0.0:8080", True),
        ("127.0.0.1.:8080", True),  # the same address, written as a name with its root dot
        ("[::1]:8080", True),
        ("[::1]", True),
        ("[fe80::1]:80", True),
        ("localhost:8080", True),
        ("LocalHost", True),
        ("localhost.:8080", True),
        ("app.localhost:3000", True),  # loopback by RFC 6761: no foreign page can be served from it
        ("gw.internal:8080", True),  # listed
        ("GW.Internal.", True),
        ("evil.example:8080", False),  # a foreign page's name, rebound to the gateway's address
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("evilocalhost", False),
        ("127.0.0.1.nip.io:8080", False),  # a public name that resolves to loopback
        ("gw.internal.evil.example", False),
        ("internal", False),
        ("::1", False),  # an IPv6 address without brackets is no Host
        ("[::1]8080", False),
        ("[::1]:http", False),
        ("[127.0.0.1]", False),
        ("[::1", False),
        ("127.0.0.1:http", False),
        ("127.0.0.1:\xb2", False),  # "²" passes str.isdigit()
        ("localhost:80:80", False),
        ("0x7f.1:8080", False),  # browsers send an address in its dotted form
        (":8080", False),
        ("", False),
    ],
)
def test_a_host_is_allowed_when_no_foreign_page_can_hold_it(host, allowed):
    assert host_allowed(host, frozenset({"gw.internal"})) is allowed


def test_the_host_policy_remembers_allowed_hosts_boundedly_and_star_switches_it_off():
    policy = host_policy(["gw.internal"])
    assert policy is not None and host_policy(["gw.internal", "*"]) is None
    assert policy.allows(None) and policy.allows("")  # no Host: no browser sent it
    assert policy.allows("gw.internal:8080") and "gw.internal:8080" in policy.seen
    assert not policy.allows("evil.example") and "evil.example" not in policy.seen
    for port in range(2 * SEEN_HOSTS_MAX):
        assert policy.allows(f"127.0.0.1:{port}")
    assert len(policy.seen) == SEEN_HOSTS_MAX
    assert policy.allows("127.0.0.1:65535") and not policy.allows("evil.example:8080")
