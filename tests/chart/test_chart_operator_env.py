"""What the chart hands the operator: a value the schema admits starts the operator, one the operator would refuse
at its start is refused by `helm install` instead, and extraEnv cannot set what the chart sets itself."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, NAMESPACE, Helm, one

from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ConfigurationError

Render = Callable[..., list[dict[str, Any]]]
ValuesFile = Callable[[dict[str, Any]], Path]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [operator] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", None if "valueFrom" in e else "") for e in operator["env"]}


def refusal(helm: Helm, values_file: ValuesFile, values: dict[str, Any]) -> str:
    """What `helm template` says refusing ``values`` (it must refuse them)."""
    result = helm.run("template", "x", str(CHART), "--namespace", NAMESPACE, "--values", str(values_file(values)),
                      check=False)  # fmt: skip
    assert result.returncode != 0, f"helm accepted {values}"
    return result.stderr


@pytest.mark.parametrize("priority", [2147483647, 1000000, -1000000, 999999, 5, 0])
def test_a_fixed_priority_from_a_values_file_reaches_the_operator(render: Render, priority: int) -> None:
    """A number in a values file reaches the templates as a float, which Helm wrote as 1e+06 from a million on: the
    operator then refused `2.147483647e+09` at its start (exit 2), after `helm install` had succeeded."""
    env = operator_env(render({"peering": {"priority": priority}}))
    assert env["LLM_TELEMETRY_OPERATOR_PRIORITY"] == str(priority)
    assert OperatorConfig.from_env(env).priority == priority


@pytest.mark.parametrize("lifetime", [15, 20, 3600])
def test_a_peering_lifetime_from_a_values_file_reaches_the_operator(render: Render, lifetime: int) -> None:
    env = operator_env(render({"peering": {"lifetimeSeconds": lifetime}}))
    assert env["LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS"] == str(lifetime)
    assert OperatorConfig.from_env(env).peering_lifetime_seconds == lifetime


@pytest.mark.parametrize("lifetime", [14, 3601, 20.5, "20"])
def test_a_peering_lifetime_the_operator_would_refuse_is_refused_by_helm(
    helm: Helm, values_file: ValuesFile, lifetime: Any
) -> None:
    assert "lifetimeSeconds" in refusal(helm, values_file, {"peering": {"lifetimeSeconds": lifetime}})


def test_a_priority_set_to_null_is_the_default_auto(render: Render) -> None:
    """`--set peering.priority=null` (or a null in a values file) takes the value out; it rendered `<nil>`, which the
    operator refuses at its start."""
    env = operator_env(render({"peering": {"priority": None}}))
    assert env["LLM_TELEMETRY_OPERATOR_PRIORITY"] == "auto"
    assert isinstance(OperatorConfig.from_env(env).priority, int)  # auto: drawn at the operator's start


ENDPOINTS_THE_OPERATOR_REFUSES = [
    ("tracesEndpoint", "http://"),
    ("tracesEndpoint", "http://:4318"),
    ("tracesEndpoint", "http://jaeger.observability:4318?tenant=a"),
    ("tracesEndpoint", "http://jaeger.observability:4318#traces"),
    ("tracesEndpoint", "http://jaeger.observability:99999"),
    ("tracesEndpoint", "http://loki-gateway.observability/otlp/v1/logs"),
    ("logsEndpoint", "http://jaeger.observability:4318/v1/traces/"),
    ("logsEndpoint", "https://loki.example.com/otlp?orgId=1"),
]

ENDPOINTS_THE_OPERATOR_TAKES = [
    ("tracesEndpoint", "http://jaeger.observability:4318"),
    ("tracesEndpoint", "http://tempo-distributor.tracing.svc.cluster.local:4318/v1/traces"),
    ("tracesEndpoint", "http://[fd00::10]:4318"),
    ("tracesEndpoint", "http://10.0.0.7:4318/"),
    ("logsEndpoint", "https://otel:secret@loki.example.com/otlp"),
    ("logsEndpoint", "http://loki-gateway.observability/otlp/v1/logs"),
    ("logsEndpoint", "http://loki:65535/otlp"),
]


@pytest.mark.parametrize(("key", "endpoint"), ENDPOINTS_THE_OPERATOR_REFUSES)
def test_an_endpoint_the_operator_would_refuse_is_refused_by_helm(
    helm: Helm, values_file: ValuesFile, key: str, endpoint: str
) -> None:
    variable = {
        "tracesEndpoint": "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT",
        "logsEndpoint": "LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT",
    }
    with pytest.raises(ConfigurationError):
        OperatorConfig.from_env({variable[key]: endpoint})
    assert f"/defaults/{key}" in refusal(helm, values_file, {"defaults": {key: endpoint}})


@pytest.mark.parametrize(("key", "endpoint"), ENDPOINTS_THE_OPERATOR_TAKES)
def test_an_endpoint_the_operator_takes_is_admitted(render: Render, key: str, endpoint: str) -> None:
    env = operator_env(render({"defaults": {key: endpoint}}))
    config = OperatorConfig.from_env(env)
    base = endpoint.rstrip("/").removesuffix("/v1/traces" if key == "tracesEndpoint" else "/v1/logs")
    assert (config.traces_endpoint if key == "tracesEndpoint" else config.logs_endpoint) == base


def chart_set_names(render: Render) -> list[str]:
    return sorted(operator_env(render()))


def test_extra_env_may_not_set_a_variable_the_chart_sets(render: Render, helm: Helm, values_file: ValuesFile) -> None:
    """values.yaml's own example set LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS, which the chart sets from resyncSeconds:
    Helm 4's server-side apply refused the Deployment ("duplicate entries for key"), Helm 3 let it override the
    value. Each name the chart sets is refused, naming the value to set instead."""
    names = chart_set_names(render)
    assert "LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS" in names and "POD_ID" in names
    for name in names:
        said = refusal(helm, values_file, {"extraEnv": [{"name": name, "value": "1"}]})
        assert f"extraEnv: {name} is set by the chart from " in said, said
    said = refusal(helm, values_file, {"extraEnv": [{"name": "LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS", "value": "600"}]})
    assert "from resyncSeconds; set that value instead" in said
    twice = [{"name": "PYTHONFAULTHANDLER", "value": "1"}, {"name": "PYTHONFAULTHANDLER", "value": "0"}]
    assert "extraEnv: PYTHONFAULTHANDLER is listed twice" in refusal(helm, values_file, {"extraEnv": twice})


def test_the_documented_extra_env_example_reaches_the_operator_once(render: Render) -> None:
    text = (CHART / "values.yaml").read_text()
    [block] = re.findall(r"^#   extraEnv:\n((?:#     .*\n)+)", text, re.M)
    example = yaml.safe_load("\n".join(line[6:] for line in block.splitlines()))
    [operator] = one(render({"extraEnv": example}), "Deployment")["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in operator["env"]]
    assert len(names) == len(set(names)), names
    for entry in example:
        assert entry in operator["env"]
    OperatorConfig.from_env(operator_env(render({"extraEnv": example})))


def test_an_empty_service_monitor_label_is_left_out(render: Render) -> None:
    """values.yaml says to drop a default label with "" where a null would bring the chart's default back (`helm
    upgrade --reset-then-reuse-values`): the operator was given `release=` and put `release: ""` on every
    ServiceMonitor and PrometheusRule it made, as did the chart on its own ServiceMonitor."""
    values = {
        "defaults": {"serviceMonitorLabels": {"release": "", "team": "ml"}},
        "serviceMonitor": {"enabled": True, "labels": {"tier": ""}},
    }
    docs = render(values)
    env = operator_env(docs)
    assert env["LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS"] == "team=ml"
    assert OperatorConfig.from_env(env).servicemonitor_labels == {"team": "ml"}
    labels = one(docs, "ServiceMonitor")["metadata"]["labels"]
    assert labels["team"] == "ml" and "release" not in labels and "tier" not in labels


def set_resync(helm: Helm, given: str) -> subprocess.CompletedProcess[str]:
    """`helm template` with `--set resyncSeconds=<given>`, as a user types it."""
    return helm.run("template", "x", str(CHART), "--namespace", NAMESPACE, "--set", f"resyncSeconds={given}",
                    check=False)  # fmt: skip


@pytest.mark.parametrize("given", ["0.5", ".25", "7.5", "300", "1e3", "2.5E+01"])
def test_a_resync_interval_given_with_set_reaches_the_operator(helm: Helm, given: str) -> None:
    """`--set` passes a number with a decimal point (or an exponent) as a string, and the schema, asking for a
    number, refused `--set resyncSeconds=0.5`; only a values file could give a fraction of a second."""
    result = set_resync(helm, given)
    assert result.returncode == 0, result.stderr
    env = operator_env([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert OperatorConfig.from_env(env).resync_seconds == float(given)


@pytest.mark.parametrize("given", ["0", "0.0", ".0", "00", "-1", "-0.5", "", "soon", "0.5s", "nan", "inf", "1e400"])
def test_a_resync_interval_the_operator_would_refuse_is_refused_by_set(helm: Helm, given: str) -> None:
    """What the string form admits, the operator takes: the rest is refused at `helm install`, not by a pod that
    exits 2 at every start."""
    with pytest.raises(ConfigurationError):
        OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS": given})
    result = set_resync(helm, given)
    assert result.returncode != 0 and "resyncSeconds" in result.stderr, result.stdout[-2000:]


def test_a_failed_startup_is_tried_again_before_the_liveness_probe_restarts_the_pod() -> None:
    """kopf answers the liveness probe only once the operator's startup is done: a startup that failed was tried
    again after kopf's default 60 s, past the chart's probe (failing from its first try until the pod is restarted),
    so no second attempt ever came in a pod, and each failed startup was a container restart."""
    from llm_telemetry_operator.handlers import STARTUP_RETRY_SECONDS

    probe = yaml.safe_load((CHART / "values.yaml").read_text())["livenessProbe"]
    restarted_after = probe["initialDelaySeconds"] + probe["periodSeconds"] * (probe["failureThreshold"] - 1)
    assert STARTUP_RETRY_SECONDS < restarted_after
