"""OperatorConfig.from_env: the operator's own environment, and ConfigurationError naming the variable."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_telemetry_operator import config as settings
from llm_telemetry_operator.config import AUTO_PRIORITY_RANGE, OperatorConfig
from llm_telemetry_operator.errors import ConfigurationError


def test_config_defaults() -> None:
    config = OperatorConfig.from_env({})
    assert config.clusterwide and config.namespaces == ()
    assert config.traces_endpoint == "http://jaeger.observability:4318"
    assert config.logs_endpoint == "http://loki-gateway.observability/otlp"
    assert dict(config.servicemonitor_labels) == {}
    assert config.dashboard_label == ("grafana_dashboard", "1")
    assert config.peering == "llm-telemetry-operator"
    assert config.metrics_port == 9465
    assert config.health == "http://0.0.0.0:8080/healthz"
    assert config.resync_seconds == 300.0
    assert config.peering_lifetime_seconds == 60  # kopf's own default
    assert (config.jaeger_datasource_uid, config.loki_datasource_uid) == ("jaeger", "loki")
    assert config.runbook_url == "docs/runbooks.md"  # the rules' own default
    assert config.logs_tenant == ""
    low, high = AUTO_PRIORITY_RANGE
    assert low <= config.priority <= high


def test_config_from_environment() -> None:
    env = {
        "LLM_TELEMETRY_OPERATOR_NAMESPACES": " llm, staging ,",
        "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT": "http://tempo.tracing:4318",
        "LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT": "https://loki.example.com/otlp",
        "LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS": "release=kube-prometheus-stack, team=ml",
        "LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL": "grafana=yes",
        "LLM_TELEMETRY_OPERATOR_PEERING": "llm-canary",
        "LLM_TELEMETRY_OPERATOR_PRIORITY": "5",
        "LLM_TELEMETRY_OPERATOR_METRICS_PORT": "0",
        "LLM_TELEMETRY_OPERATOR_HEALTH": "",
        "LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS": "30",
        "LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS": "20",
        "LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID": "P14A4C8C6B8A2B0D1",
        "LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID": "loki_logs-1",
        "LLM_TELEMETRY_OPERATOR_RUNBOOK_URL": "https://wiki.example.com/llm/runbooks",
        "LLM_TELEMETRY_OPERATOR_LOGS_TENANT": "team-a",
    }
    with mock.patch.dict(os.environ, env):
        config = OperatorConfig.from_env()
    assert config.namespaces == ("llm", "staging") and not config.clusterwide
    assert config.traces_endpoint == "http://tempo.tracing:4318"
    assert config.logs_endpoint == "https://loki.example.com/otlp"
    assert dict(config.servicemonitor_labels) == {"release": "kube-prometheus-stack", "team": "ml"}
    assert config.dashboard_label == ("grafana", "yes")
    assert config.peering == "llm-canary"
    assert config.priority == 5
    assert config.metrics_port == 0 and config.health == ""
    assert config.resync_seconds == 30.0
    assert config.peering_lifetime_seconds == 20
    assert (config.jaeger_datasource_uid, config.loki_datasource_uid) == ("P14A4C8C6B8A2B0D1", "loki_logs-1")
    assert config.runbook_url == "https://wiki.example.com/llm/runbooks"
    assert config.logs_tenant == "team-a"


def test_config_auto_priority_differs_between_pods() -> None:
    # Each replica process draws its own; equal priorities would pause every replica.
    draws = {OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_PRIORITY": "auto"}).priority for _ in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_TELEMETRY_OPERATOR_NAMESPACES", "llm,Not_A_Namespace"),
        ("LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT", "jaeger:4318"),
        ("LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT", "ftp://loki"),
        ("LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT", "http://[oops:4318"),
        ("LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT", "http://jaeger:99999"),
        ("LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT", "http://loki:port/otlp"),
        ("LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS", "release"),
        ("LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL", "a=1,b=2"),
        ("LLM_TELEMETRY_OPERATOR_PEERING", "Bad_Name"),
        ("LLM_TELEMETRY_OPERATOR_PRIORITY", "high"),
        ("LLM_TELEMETRY_OPERATOR_METRICS_PORT", "70000"),
        ("LLM_TELEMETRY_OPERATOR_METRICS_PORT", "http"),
        ("LLM_TELEMETRY_OPERATOR_HEALTH", "0.0.0.0:8080"),
        ("LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS", "0"),
        ("LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS", "soon"),
        # float() reads both: with nan no resync nor retry was ever due (its due times compare unequal to
        # themselves), and with inf the retries' backoff had no ceiling.
        ("LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS", "nan"),
        ("LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS", "inf"),
        # kopf renews an entry 5 to 10 s before it runs out: a shorter lifetime leaves a replica dead between
        # keepalives. kopf writes whole seconds.
        ("LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS", "14"),
        ("LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS", "3601"),
        ("LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS", "20.5"),
        ("LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS", "soon"),
        ("LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID", "jaeger.prod"),
        ("LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID", "l" * 41),
        ("LLM_TELEMETRY_OPERATOR_RUNBOOK_URL", "https://wiki.example.com/run books"),
        ("LLM_TELEMETRY_OPERATOR_RUNBOOK_URL", "https://wiki.example.com/runbooks#top"),
        ("LLM_TELEMETRY_OPERATOR_LOGS_TENANT", "team a"),
        ("LLM_TELEMETRY_OPERATOR_LOGS_TENANT", ".."),
        ("LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT", "http://loki:3100/otlp?org=a"),
        ("LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT", "http://collector:4318/v1/logs"),
    ],
)
def test_config_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name}"):
        OperatorConfig.from_env({name: value})


def test_config_otlp_endpoints_given_with_the_signals_path_lose_it() -> None:
    config = OperatorConfig.from_env(
        {
            "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT": "http://jaeger.observability:4318/v1/traces",
            "LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT": "http://loki-gateway.observability/otlp/v1/logs/",
        }
    )
    assert config.traces_endpoint == "http://jaeger.observability:4318"
    assert config.logs_endpoint == "http://loki-gateway.observability/otlp"


def test_config_health_and_metrics_on_one_port_is_refused_at_startup() -> None:
    """Two listeners on one port: the second bind failed with a traceback and the operator exited, a crash loop."""
    env = {"LLM_TELEMETRY_OPERATOR_HEALTH": "http://0.0.0.0:9465/healthz"}
    env["LLM_TELEMETRY_OPERATOR_METRICS_PORT"] = "9465"
    with pytest.raises(ConfigurationError, match=r"^LLM_TELEMETRY_OPERATOR_HEALTH=.*same port"):
        OperatorConfig.from_env(env)
    with pytest.raises(ConfigurationError, match="integer or auto"):
        OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_PRIORITY": "high"})


#: Namespace names (DNS labels), a few so that lists of them repeat some.
_NAMESPACE_NAMES = st.sampled_from(["llm", "staging", "a", "team-b", "x1"])


@given(st.lists(st.tuples(_NAMESPACE_NAMES, st.sampled_from(["", " ", "  "]), st.sampled_from(["", " "])), max_size=8))
def test_each_watched_namespace_is_taken_once(listed: list[tuple[str, str, str]]) -> None:
    """A namespace named twice in LLM_TELEMETRY_OPERATOR_NAMESPACES ("a,b,a", " a , a") is watched once, the
    namespaces in the order first given (kopf's own watch took it once; the operator's watches of the workloads and
    children, its permission checks and its startup list took it as often as it was named)."""
    value = ",".join(f"{before}{name}{after}" for name, before, after in listed)
    config = OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_NAMESPACES": value})
    names = [name for name, _, _ in listed]
    assert config.namespaces == tuple(sorted(set(names), key=names.index))


def test_an_empty_peering_lifetime_is_the_default() -> None:
    """The chart leaves the variable empty after `helm upgrade --reuse-values` from a release without the value."""
    config = OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS": ""})
    assert config.peering_lifetime_seconds == 60


def test_the_environment_table_of_operator_md_is_what_the_operator_reads() -> None:
    """docs/operator.md's table of the operator's variables: a row for each one it declares, and no other, each
    with the default the operator takes. Given as the variable, a documented default changes nothing ("empty" is the
    empty text); ``auto``, the priority's, draws a new number each time, so it is compared as the setting's text."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    rows = dict(re.findall(r"^\| `(LLM_TELEMETRY_OPERATOR_[A-Z_]+)` \| ([^|]+) \|", text, re.MULTILINE))
    declared = {getattr(settings, name) for name in dir(settings) if name.startswith("LLM_TELEMETRY_OPERATOR_")}
    assert sorted(rows) == sorted(declared)

    def resolved(env: dict[str, str]) -> OperatorConfig:
        return dataclasses.replace(OperatorConfig.from_env(env), priority=0)

    for var, default in rows.items():
        first = re.match(r"`?([^`\s]+)", default)
        assert first is not None
        value = "" if default.startswith("empty") else first[1]
        if var == settings.LLM_TELEMETRY_OPERATOR_PRIORITY:
            assert value == settings.DEFAULT_PRIORITY
        assert resolved({var: value}) == resolved({}), f"{var}: the documented default {value!r}"
