"""Alert and recording rules: rendered files checked and unit-tested by the real ``promtool``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_telemetry.monitoring.rules import (
    DEFAULT_RUNBOOK_URL,
    METRICS,
    AlertThresholds,
    build_prometheus_rule,
    build_rule_groups,
    recorded_selector,
    render_rule_file,
)
from prometheus_operator import find_schemas

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMTOOL_TESTS = REPO_ROOT / "tests" / "promtool"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")

#: Rule files the YAML tests in tests/promtool reference, by file name.
VARIANTS: dict[str, dict[str, Any]] = {
    "rules.yaml": {},
    "rules-budget.yaml": {"thresholds": AlertThresholds(cost_per_hour_usd=10)},
    "rules-objectives.yaml": {
        "thresholds": AlertThresholds(availability_objective=0.995, ttft_objective=0.95, ttft_objective_seconds=1.0)
    },
    "rules-selector.yaml": {"selector": 'namespace="llm",job="chat"'},
    "rules-search.yaml": {"selector": 'namespace="llm",job="search"', "thresholds": AlertThresholds(error_ratio=0.5)},
    # The thresholds an older resource has stored (the defaults before): not bucket boundaries.
    "rules-p95.yaml": {"thresholds": AlertThresholds(p95_ttft_seconds=2, p95_request_duration_seconds=60)},
}


def _all_rules(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"]]


def _alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _all_rules(groups) if "alert" in rule}


def _promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def _write_variants(directory: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
    for name, kwargs in {**VARIANTS, **(overrides or {})}.items():
        (directory / name).write_text(render_rule_file(**kwargs))


# --- promtool ----------------------------------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"thresholds": AlertThresholds(cost_per_hour_usd=25.5)},
        {"thresholds": AlertThresholds(availability_objective=0.999, ttft_objective=0.9, ttft_objective_seconds=0.5)},
        {"selector": 'namespace="llm",job="chat-metrics"'},
        {"selector": '{job=~"chat|search"}', "runbook_url": "https://example.org/runbooks.html"},
    ],
    ids=["defaults", "budget", "objectives", "selector", "regex-selector"],
)
def test_rule_file_passes_promtool_check(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(render_rule_file(**kwargs))
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", sorted(p.name for p in PROMTOOL_TESTS.glob("*.yaml")))
def test_promtool_unit_tests_pass(tmp_path: Path, test_file: str) -> None:
    _write_variants(tmp_path)
    shutil.copy(PROMTOOL_TESTS / test_file, tmp_path / test_file)
    result = _promtool("test", "rules", test_file, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize(
    ("test_file", "variant", "kwargs"),
    [
        # Thresholds that the synthetic series no longer break: the tests expecting alerts must fail.
        ("errors_and_latency.yaml", "rules.yaml", {"thresholds": AlertThresholds(error_ratio=0.2)}),
        ("cost_budget.yaml", "rules-budget.yaml", {"thresholds": AlertThresholds(cost_per_hour_usd=40)}),
        ("burn_rates.yaml", "rules.yaml", {"thresholds": AlertThresholds(availability_objective=0.5)}),
        # Without the selector the other services' errors alert too.
        ("selector.yaml", "rules-selector.yaml", {}),
    ],
)
def test_promtool_unit_tests_catch_wrong_rules(tmp_path: Path, test_file: str, variant: str, kwargs: Any) -> None:
    _write_variants(tmp_path, {variant: kwargs})
    shutil.copy(PROMTOOL_TESTS / test_file, tmp_path / test_file)
    result = _promtool("test", "rules", test_file, cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# --- structure ---------------------------------------------------------------------------------------


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    alerts = _alerts(build_rule_groups(AlertThresholds(cost_per_hour_usd=1)))
    assert len(alerts) == 16
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["annotations"]["runbook_url"] == f"{DEFAULT_RUNBOOK_URL}#{name.lower()}"


def test_runbook_url_base_is_configurable() -> None:
    alerts = _alerts(build_rule_groups(runbook_url="https://runbooks.example.org/llm"))
    assert (
        alerts["LLMHighErrorRatio"]["annotations"]["runbook_url"]
        == "https://runbooks.example.org/llm#llmhigherrorratio"
    )


def test_cost_alert_only_with_a_budget() -> None:
    assert "LLMCostBudgetExceeded" not in _alerts(build_rule_groups())
    rule = _alerts(build_rule_groups(AlertThresholds(cost_per_hour_usd=12.5)))["LLMCostBudgetExceeded"]
    assert rule["expr"].endswith("> 12.5")


def test_recording_rules_are_named_llm_and_keep_namespace_and_job() -> None:
    records = [r for r in _all_rules(build_rule_groups()) if "record" in r]
    assert records
    assert "llm:gen_ai_server_time_to_first_token_seconds:p95_5m" in {r["record"] for r in records}
    for rule in records:
        assert rule["record"].startswith("llm:")
        for clause in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            assert {"namespace", "job"} <= {label.strip() for label in clause.split(",")}, rule


def test_selector_reaches_every_raw_metric() -> None:
    selector = 'namespace="llm",job="chat"'
    raw = (*METRICS, "up")
    for rule in _all_rules(build_rule_groups(selector=selector)):
        for metric in re.findall(r"\b([a-z_]+)(?:\{|\[| == )", rule["expr"]):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            if base in raw:
                assert re.search(rf"\b{metric}\{{{re.escape(selector)}", rule["expr"]), (metric, rule["expr"])


@pytest.mark.parametrize(
    ("selector", "kept"),
    [
        ('namespace="llm",job="chat"', 'namespace="llm",job="chat"'),
        ("job=~'chat|search', container=\"api,v2\"", "job=~'chat|search'"),  # recorded series have no container
        ('tier!="batch"', ""),
    ],
)
def test_alerts_read_only_their_own_services_recorded_series(selector: str, kept: str) -> None:
    """Every service's rules record under the same names, so each alert selects the recorded series of its own
    service, by the selector's matchers on the labels recording keeps (tests/promtool/two_services.yaml runs it)."""
    assert recorded_selector(selector) == kept
    alerts = _alerts(build_rule_groups(AlertThresholds(cost_per_hour_usd=1), selector=selector))
    reads = [(name, ref) for name, rule in alerts.items() for ref in re.findall(r"llm:[^\s)\[]+", rule["expr"])]
    assert {name for name, _ in reads} >= {"LLMHighErrorRatio", "LLMTokenRateAnomaly", "LLMCostBudgetExceeded"}
    for name, ref in reads:
        assert ref.partition("{")[2] == (f"{kept}}}" if kept else ""), (name, ref)


def test_selector_braces_are_optional_and_bad_selectors_are_refused() -> None:
    assert render_rule_file(selector='{job="chat"}') == render_rule_file(selector='job="chat"')
    with pytest.raises(ValueError, match="selector"):
        build_rule_groups(selector='up{job="chat"}')
    for bad in ('job="chat" namespace="llm"', "job=chat", 'job="chat",,namespace="llm"'):
        with pytest.raises(ValueError, match="selector"):
            build_rule_groups(selector=bad)


def test_ttft_objective_must_be_a_bucket_boundary() -> None:
    with pytest.raises(ValueError, match=r"bucket boundary.*2\.5"):
        AlertThresholds(ttft_objective_seconds=3.0)
    groups = build_rule_groups(AlertThresholds(ttft_objective_seconds=1))
    ttft = next(r for r in _all_rules(groups) if r.get("record") == "llm:slo_ttft:ratio_rate5m")
    assert 'le="1.0"' in ttft["expr"]  # the exporter writes bucket bounds as Python floats


@pytest.mark.parametrize(
    "kwargs",
    [{"availability_objective": 1.0}, {"error_ratio": 0}, {"error_ratio": 1.5}, {"cost_per_hour_usd": -1}],
)
def test_thresholds_reject_impossible_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AlertThresholds(**kwargs)


def test_burn_rate_alerts_use_both_windows_of_each_pair() -> None:
    alerts = _alerts(build_rule_groups(AlertThresholds(availability_objective=0.999)))
    fast = alerts["LLMAvailabilityBurnRateFast"]["expr"]
    assert "llm:slo_availability:ratio_rate1h > (14.4 * (1 - 0.999))" in fast
    assert "llm:slo_availability:ratio_rate5m > (14.4 * (1 - 0.999))" in fast
    assert "llm:slo_availability:ratio_rate6h > (6 * (1 - 0.999))" in fast
    slow = alerts["LLMAvailabilityBurnRateSlow"]["expr"]
    assert "llm:slo_availability:ratio_rate3d > (1 * (1 - 0.999))" in slow
    assert alerts["LLMAvailabilityBurnRateFast"]["labels"]["severity"] == "critical"
    assert alerts["LLMAvailabilityBurnRateSlow"]["labels"]["severity"] == "warning"


@given(
    objective=st.floats(min_value=0.5, max_value=1, exclude_max=True),
    ratio=st.floats(min_value=1e-9, max_value=1),
    cost=st.floats(min_value=1e-6, max_value=1e12),
)
def test_thresholds_are_written_as_the_numbers_given(objective: float, ratio: float, cost: float) -> None:
    """Each threshold reads back as the float configured: six significant digits turned an objective of 0.9999999
    into 1 (a budget of 0: the burn-rate alerts fired on any error), an error ratio of 0.9999995 into 1 (never
    fires), and a budget of 1234567.8 USD into 1.23457e+06."""
    alerts = _alerts(
        build_rule_groups(
            AlertThresholds(
                availability_objective=objective,
                ttft_objective=objective,
                error_ratio=ratio,
                tool_failure_ratio=ratio,
                cost_per_hour_usd=cost,
            )
        )
    )
    for name in ("LLMAvailabilityBurnRateFast", "LLMTimeToFirstTokenBurnRateSlow"):
        written = re.findall(r"\(1 - ([^)]+)\)\)", alerts[name]["expr"])
        assert written and all(float(number) == objective for number in written), (name, written)
    for name, value in (
        ("LLMHighErrorRatio", ratio),
        ("LLMHighToolFailureRatio", ratio),
        ("LLMCostBudgetExceeded", cost),
    ):
        threshold = re.search(r" > (\S+)", alerts[name]["expr"])
        assert threshold and float(threshold[1]) == value, name


def test_prometheus_rule_object_validates_against_the_operator_schema() -> None:
    obj = build_prometheus_rule(
        "chat-llm",
        "llm",
        AlertThresholds(cost_per_hour_usd=3),
        selector='namespace="llm",job="chat"',
        labels={"release": "kube-prometheus-stack"},
    )
    assert (obj["apiVersion"], obj["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert obj["metadata"] == {"name": "chat-llm", "namespace": "llm", "labels": {"release": "kube-prometheus-stack"}}
    # The object must survive a JSON round trip (what the Kubernetes client sends).
    assert json.loads(json.dumps(obj)) == obj
    # The Prometheus Operator's own schema (npm @kubernetes-models/prometheus-operator); skips without node/npm.
    find_schemas().assert_valid([obj])


def test_committed_rule_file_is_the_rendering() -> None:
    committed = REPO_ROOT / "docs" / "rules" / "llm-telemetry.rules.yaml"
    assert committed.read_text() == render_rule_file(), "regenerate with: llm-telemetry rules > " + str(
        committed.relative_to(REPO_ROOT)
    )


def test_docs_cover_every_alert() -> None:
    alerts = _alerts(build_rule_groups(AlertThresholds(cost_per_hour_usd=1)))
    runbooks = (REPO_ROOT / "docs" / "runbooks.md").read_text()
    reference = (REPO_ROOT / "docs" / "alerts.md").read_text()
    headings = {line.lstrip("#").strip().lower() for line in runbooks.splitlines() if line.startswith("## ")}
    for name in alerts:
        assert name.lower() in headings, f"docs/runbooks.md has no '## {name}' section"
        assert name in reference, f"docs/alerts.md does not describe {name}"


def _runbook_queries(alert: str) -> list[str]:
    """The PromQL queries the runbook section of ``alert`` gives inline (a backticked expression that counts)."""
    text = (REPO_ROOT / "docs" / "runbooks.md").read_text()
    section = text.split(f"\n## {alert}\n", 1)[1].split("\n## ", 1)[0]
    return [" ".join(q.split()) for q in re.findall(r"`([^`]*\bcount\b[^`]*)`", section)]


@needs_promtool
def test_the_overflow_runbooks_queries_name_the_services_own_metrics_and_count_its_labels(tmp_path: Path) -> None:
    """LLMTelemetrySeriesOverflow's runbook queries, on the series of a service past the series limit beside another
    one, with the rules recording: the overflowing metrics are the service's own (not the recorded ``llm:...`` series,
    which keep ``otel_metric_overflow``, nor another service's), and the label counts are its models and tenants."""
    service = 'namespace="llm",job="chat"'
    series = {
        # Three models times two tenants, and the overflow series: no model, no tenant.
        **{
            f'llm_requests_total{{{service},gen_ai_request_model="m{m}",llm_metadata_tenant="t{t}"}}': "0+1x20"
            for m in range(3)
            for t in range(2)
        },
        f'llm_requests_total{{{service},otel_metric_overflow="true"}}': "0+5x20",
        f'gen_ai_server_request_duration_seconds_bucket{{{service},otel_metric_overflow="true",le="1.28"}}': "0+5x20",
        f'gen_ai_server_request_duration_seconds_bucket{{{service},otel_metric_overflow="true",le="+Inf"}}': "0+5x20",
        f'gen_ai_server_request_duration_seconds_count{{{service},otel_metric_overflow="true"}}': "0+5x20",
        # Another service of the same Prometheus, past its limit too.
        'llm_requests_total{namespace="llm",job="search",gen_ai_request_model="m9"}': "0+1x20",
        'llm_requests_total{namespace="llm",job="search",otel_metric_overflow="true"}': "0+5x20",
        'llm_tokens_total{namespace="llm",job="search",otel_metric_overflow="true"}': "0+50x20",
    }
    documented = _runbook_queries("LLMTelemetrySeriesOverflow")
    queries = [query.replace("<ns>", "llm").replace("<job>", "chat") for query in documented]
    assert len(queries) == 2, queries
    names, models = queries
    tenants = models.replace("gen_ai_request_model", "llm_metadata_tenant")  # "the same by each llm_metadata_* label"
    expected = {
        names: [
            ('{__name__="gen_ai_server_request_duration_seconds_bucket"}', 2),
            ('{__name__="gen_ai_server_request_duration_seconds_count"}', 1),
            ('{__name__="llm_requests_total"}', 1),
        ],
        models: [("{}", 4)],  # m0, m1, m2 and the overflow series
        tenants: [("{}", 3)],  # t0, t1 and the overflow series
    }
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "15m",
                        "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
                    }
                    for expr, samples in expected.items()
                ],
            }
        ],
    }
    (tmp_path / "rules.yaml").write_text(render_rule_file())
    (tmp_path / "runbook_queries.yaml").write_text(json.dumps(test))
    result = _promtool("test", "rules", "runbook_queries.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
