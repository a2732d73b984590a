"""Config: env expansion, inheritance, and errors that name the key and the reason."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.config import ConfigError, GatewayConfig, parse_config, redact


def _cfg(**model_extra):
    return {
        "models": [{"name": "m", "deployments": [{"id": "d", "base_url": "http://h:1/v1"}], **model_extra}]
    }


def test_env_expansion_with_default_and_missing_var():
    raw = _cfg()
    raw["models"][0]["deployments"][0]["api_key"] = "${KEY_X}"
    raw["models"][0]["deployments"][0]["model"] = "${UP_MODEL:-gpt-x}"
    cfg = parse_config(raw, env={"KEY_X": "secret"})
    d = cfg.models[0].deployments[0]
    assert d.api_key == "secret" and d.model == "gpt-x"
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.deployments\[0\]\.api_key: environment variable KEY_X"
    ):
        parse_config(raw, env={})


def test_model_defaults_and_deployment_inheritance():
    raw = _cfg(timeouts={"ttft_ms": 700})
    raw["model_defaults"] = {"timeouts": {"connect_ms": 300, "ttft_ms": 900}, "retry": {"max_retries": 4}}
    raw["models"][0]["deployments"].append(
        {"id": "e", "base_url": "http://h:2/v1", "timeouts": {"idle_ms": 5}}
    )
    cfg = parse_config(raw)
    m = cfg.models[0]
    assert m.retry.max_retries == 4
    assert m.timeouts.connect_ms == 300 and m.timeouts.ttft_ms == 700
    d0, d1 = m.deployments
    assert d0.timeouts.ttft_ms == 700 and d0.timeouts.connect_ms == 300
    assert d1.timeouts.idle_ms == 5 and d1.timeouts.ttft_ms == 700


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda r: r["models"][0]["deployments"][0].update(base_url="ftp://x"),
            "models[0].deployments[0].base_url: not a URL",
        ),
        (
            lambda r: r["models"][0].update(retry={"retry_on": ["teapot"]}),
            "models[0].retry.retry_on: unknown condition 'teapot'",
        ),
        (
            lambda r: r["models"][0].update(hedging={"min_delay_ms": 10, "max_delay_ms": 5}),
            "min_delay_ms must not exceed",
        ),
        (
            lambda r: r["models"][0].update(fallbacks=["ghost"]),
            "models[0].fallbacks[0]: 'ghost' is not a configured model",
        ),
        (lambda r: r.update(state={"backend": "etcd"}), "state.backend"),
        (
            lambda r: r["models"][0]["deployments"].append({"id": "d", "base_url": "http://h:1"}),
            "models[0].deployments[1].id: 'd' is already used by this model",
        ),
        (lambda r: r["models"][0].update(timeouts={"ttft_ms": -1}), "models[0].timeouts.ttft_ms"),
        (lambda r: r.update(servr={}), "servr: unknown key"),
        # YAML's yes/no/true/false where a number is wanted (lax mode read them as 1 and 0)
        (lambda r: r.update(server={"port": True}), "server.port: a number is wanted, not true"),
        (
            lambda r: r["models"][0].update(retry={"max_retries": False}),
            "models[0].retry.max_retries: a number is wanted, not false",
        ),
        (
            lambda r: r["models"][0].update(hedging={"enabled": True, "delay_ms": True}),
            "models[0].hedging.delay_ms: a number is wanted, not true",
        ),
        (
            lambda r: r["models"][0]["deployments"][0].update(headers={"x-team": "a\r\nx-admin: 1"}),
            "models[0].deployments[0].headers: the value of 'x-team' holds a line break",
        ),
        (
            lambda r: r["models"][0]["deployments"][0].update(headers={"bad name": "v"}),
            "'bad name' is not a valid HTTP header",
        ),
        (
            lambda r: r["models"][0]["deployments"][0].update(api_key="sk-1\n"),
            "deployments[0].api_key: holds a line break",
        ),
    ],
)
def test_errors_name_the_key(mutate, message):
    raw = _cfg()
    mutate(raw)
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert message in str(exc.value)


def test_a_model_defaults_mistake_is_reported_with_the_rest_of_the_file():
    raw = _cfg()
    raw["model_defaults"] = {"timeout": {"ttft_ms": 500}, "retry": {"max_retries": 3}}
    raw["server"] = {"port": "http"}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    problems = str(exc.value).splitlines()
    assert any(p.startswith("model_defaults.timeout: not a key models inherit") for p in problems), problems
    assert any(p.startswith("server.port:") for p in problems), problems  # not hidden by the first
    raw["server"] = {}
    raw["model_defaults"] = ["timeouts"]
    with pytest.raises(ConfigError, match="model_defaults: must be a mapping"):
        parse_config(raw)


def test_numbers_from_environment_strings_and_booleans_where_booleans_belong_still_load():
    raw = _cfg(hedging={"enabled": True, "delay_ms": "${HEDGE_MS}"})
    raw["server"] = {"port": "${PORT}"}
    cfg = parse_config(raw, env={"PORT": "8081", "HEDGE_MS": "250"})
    assert cfg.server.port == 8081
    assert cfg.models[0].hedging.enabled is True and cfg.models[0].hedging.delay_ms == 250


def test_fallback_loop_is_rejected():
    raw = {
        "models": [
            {"name": "a", "deployments": [{"id": "a1", "base_url": "http://h/v1"}], "fallbacks": ["b"]},
            {"name": "b", "deployments": [{"id": "b1", "base_url": "http://h/v1"}], "fallbacks": ["a"]},
        ]
    }
    with pytest.raises(ConfigError, match="fallbacks: loop a -> b -> a"):
        parse_config(raw)


def test_redact_hides_every_secret():
    raw = _cfg()
    raw["models"][0]["deployments"][0].update(
        api_key="sk-secret", headers={"api-key": "az-secret", "x-team": "t"}
    )
    raw["state"] = {"backend": "redis", "redis_url": "redis://:pw-secret@h:6379/0"}
    text = str(redact(parse_config(raw)))
    assert "sk-secret" not in text and "az-secret" not in text and "pw-secret" not in text
    assert "'x-team': '***'" in text  # every header value: an allow-list of nothing, not a guess by name


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, key) for every key of the config schema, nested models included."""
    out = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        out.append((prefix + key, key))
        args = typing.get_args(f.annotation)
        for t in (f.annotation, *args, *(a for x in args for a in typing.get_args(x))):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += _keys(t, prefix + key + ".")
    return out


def test_every_config_key_is_documented():
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    keys = _keys(GatewayConfig)
    assert len(keys) > 60  # the walk reached the nested sections
    missing = [path for path, key in keys if f"`{key}`" not in doc and f"{key}:" not in doc]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def _problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    return str(exc.value).splitlines()


def test_checks_across_models_are_reported_with_a_wrong_field_elsewhere():
    """A typo in one model used to hide every duplicate, unknown fallback and loop: check-config showed one."""
    raw = {
        "models": [
            {
                "name": "a",
                "deployments": [{"id": "x", "base_url": "http://h/v1"}],
                "retyr": {},
                "fallbacks": ["b"],
            },
            {
                "name": "b",
                "deployments": [{"id": "x", "base_url": "http://h/v1"}],
                "fallbacks": ["a", "nope"],
            },
            {"name": "a", "deployments": [{"id": "y", "base_url": "http://h/v1"}]},
        ],
        "state": {"redis_mode": "sentinel"},
    }
    assert _problems(raw) == [
        "models[0].retyr: unknown key (check the spelling; see docs/configuration.md)",
        "models[2].name: model 'a' is defined twice",
        "models[1].fallbacks[1]: 'nope' is not a configured model",
        "models[1].deployments[0].id: 'x' is already used by model 'a'; ids name metrics and shared state, "
        "so they must be unique",
        "fallbacks: loop a -> b -> a",
        "state.redis_mode: sentinel needs state.backend: redis",
    ]


def test_a_wrong_model_default_is_named_where_it_is_written_once():
    raw = _cfg()
    raw["models"].append({"name": "n", "deployments": [{"id": "e", "base_url": "http://h/v1"}]})
    raw["model_defaults"] = {"timeouts": {"connect_ms": -1}, "hedging": 5, "retry": {"max_retries": 3}}
    assert _problems(raw) == [
        "model_defaults.timeouts.connect_ms: Input should be greater than 0",
        "model_defaults.hedging: Input should be a valid dictionary or instance of HedgingConfig",
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda r: r["models"][0].update(hedging={"delay_ms": -5}),
            "delay_ms must be a number of milliseconds",
        ),
        (lambda r: r["models"][0].update(hedging={"delay_ms": float("nan")}), "models[0].hedging.delay_ms"),
        (
            lambda r: r["models"][0].update(routing={"probe_interval_s": -1}),
            "models[0].routing.probe_interval_s",
        ),
        (
            lambda r: r["models"][0].update(routing={"probe_interval_s": float("nan")}),
            "models[0].routing.probe_interval_s",
        ),
        (lambda r: r["models"][0].update(timeouts={"total_ms": float("inf")}), "models[0].timeouts.total_ms"),
        (
            lambda r: r.update(server={"drain_timeout_s": float("inf")}),
            "server.drain_timeout_s: Input should be",
        ),
        (
            lambda r: r["models"][0].update(outlier={"base_ejection_s": 600, "max_ejection_s": 10}),
            "base_ejection_s must not exceed max_ejection_s",
        ),
        (
            lambda r: r["models"][0].update(retry={"backoff_base_ms": 500, "backoff_max_ms": 100}),
            "backoff_base_ms must not exceed backoff_max_ms",
        ),
        (
            lambda r: r.update(server={"port": 9000, "admin_port": 9000}),
            "server.admin_port: 9000 is server.port",
        ),
        (
            lambda r: r.update(tracing={"otlp_endpoint": "not a url"}),
            "tracing.otlp_endpoint: not an OTLP/HTTP URL",
        ),
        *(
            (
                lambda r, bad=bad: r.update(server={"allowed_hosts": ["gw.internal", bad]}),
                f"server.allowed_hosts: entry 1 ({bad!r}) is not a host name",
            )
            for bad in (
                "http://gw.internal",
                "gw.internal:8080",
                "*.example.com",
                "gw.internal/v1",
                "",
                "gätewäy",
            )
        ),
        (
            lambda r: r["models"][0].update(fallbacks=["m2", "m2"]),
            "models[0].fallbacks[1]: 'm2' is listed twice",
        ),
        (lambda r: r["models"][0].update(name=" "), "models[0].name: must be 1-256 characters"),
        (lambda r: r["models"][0].update(name="chat\n"), "models[0].name: must be 1-256 characters"),
        (
            lambda r: r["models"][0]["deployments"][0].update(id="a\nX-Injected: 1"),
            "models[0].deployments[0].id: must be 1-128 visible ASCII characters",
        ),
        (
            lambda r: r["models"][0]["deployments"][0].update(id="a b"),
            "deployments[0].id: must be 1-128 visible",
        ),
        (lambda r: r["models"][0]["deployments"][0].update(base_url="https://x y/v1"), "base_url: not a URL"),
        (
            lambda r: r["models"][0]["deployments"][0].update(base_url="http://h:99999/v1"),
            "base_url: not a URL",
        ),
        (
            lambda r: r.update(auth={"keys": [{"id": "k", "hash": "sha256:" + "z" * 64}]}),
            "auth.keys[0].hash: must be the output of `llmgw keys hash KEY`",
        ),
        (
            lambda r: r.update(auth={"keys": [{"id": "k", "hash": "sha256:" + "a" * 64}] * 2}),
            "auth.keys[1].id: 'k' is used twice",
        ),
        (
            lambda r: r.update(auth={"keys": [{"id": "", "hash": "sha256:" + "a" * 64}]}),
            "auth.keys[0].id: must be",
        ),
    ],
)
def test_values_that_cannot_work_are_refused(mutate, message):
    raw = _cfg()
    raw["models"].append({"name": "m2", "deployments": [{"id": "d2", "base_url": "http://h:2/v1"}]})
    mutate(raw)
    problems = _problems(raw)
    assert any(message in p for p in problems), problems


def test_names_and_ids_that_work_are_accepted():
    raw = _cfg()
    raw["models"][0].update(name="accounts/fireworks/models/llama-v3p1 8b")
    raw["models"][0]["deployments"][0].update(id="azure:eu-west/gpt-4o_mini.2")
    raw["auth"] = {"keys": [{"id": "team-a:svc.1", "hash": "sha256:" + "0123456789abcdef" * 4}]}
    cfg = parse_config(raw)
    assert cfg.models[0].name == "accounts/fireworks/models/llama-v3p1 8b"


def test_allowed_hosts_are_names_compared_in_lower_case_without_the_root_dot():
    raw = _cfg()
    raw["server"] = {
        "allowed_hosts": ["GW.Internal.", "llm_gateway", "gw-llm-gateway.llm.svc.cluster.local", "*"]
    }
    hosts = parse_config(raw).server.allowed_hosts
    assert hosts == ["gw.internal", "llm_gateway", "gw-llm-gateway.llm.svc.cluster.local", "*"]
    assert parse_config(_cfg()).server.allowed_hosts == []


def test_unreadable_schema_files_are_reported_with_the_rest(tmp_path: Path):
    from gateway.config import load_config

    path = tmp_path / "gw.yaml"
    path.write_text(
        "models:\n"
        "  - name: m\n"
        "    retyr: {}\n"
        "    warmup: {schemas: [missing.json, also-missing.json]}\n"
        "    deployments: [{id: d, base_url: 'http://h/v1'}]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    problems = str(exc.value).splitlines()
    assert problems[0] == "models[0].retyr: unknown key (check the spelling; see docs/configuration.md)"
    assert problems[1].startswith("models[0].warmup.schemas[0]: cannot read missing.json")
    assert problems[2].startswith("models[0].warmup.schemas[1]: cannot read also-missing.json")
    path.write_text(path.read_text().replace("    retyr: {}\n", ""))
    with pytest.raises(ConfigError) as exc:  # alone, both files are still named
        load_config(path)
    assert len(str(exc.value).splitlines()) == 2


def test_an_empty_otlp_endpoint_leaves_tracing_off():
    """``otlp_endpoint: ${OTEL_COLLECTOR:-}`` with the variable unset gives "": off, not a bad URL."""
    raw = _cfg()
    raw["tracing"] = {"otlp_endpoint": "${OTEL_COLLECTOR:-}"}
    assert parse_config(raw, env={}).tracing.otlp_endpoint == ""
