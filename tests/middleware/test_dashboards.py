"""The Grafana dashboard: structure, variables, and PromQL that parses and stays inside the metric contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_telemetry import instruments
from llm_telemetry.monitoring.dashboards import OVERFLOW_LEGEND as OVERFLOW
from llm_telemetry.monitoring.dashboards import build_dashboard, render_dashboard_json
from llm_telemetry.monitoring.rules import METRICS, SCRAPE_LABELS, AlertThresholds, build_rule_groups

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")

ROWS = ["Health", "Latency", "Tokens and cost", "Errors and finish reasons", "Tools", "Attribution"]
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _prometheus_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) if p["datasource"]["type"] == "prometheus" for t in p["targets"]]


def _dashboard_expr_as_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would for "All" selections."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$[a-z_]+", ".*", expr)


def references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """Metrics an expression reads, with the labels each one's matchers use, and the labels of its clauses."""
    clause_labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        clause_labels |= {label.strip() for label in clause.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    metrics: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        metrics.setdefault(name, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    for name in re.findall(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare):
        if name not in PROMQL_KEYWORDS:
            metrics.setdefault(name, set())
    return metrics, clause_labels


def _check_contract(expr: str, attribution: set[str], recorded: set[str]) -> None:
    metrics, clause_labels = references(expr)
    # otel_metric_overflow: the label of every metric's overflow series (instruments.CARDINALITY_LIMIT).
    allowed_everywhere = {*SCRAPE_LABELS, "le", OVERFLOW_LABEL}
    available: set[str] = set()
    for name, labels in metrics.items():
        if name in recorded or name == "up":
            continue
        base = re.sub(r"_(bucket|count|sum)$", "", name) if name.endswith(("_bucket", "_count", "_sum")) else name
        assert base in METRICS, f"{name} in {expr!r} is not an exported metric"
        spec = METRICS[base]
        own = set(spec.labels) | (attribution if spec.attributed else set())
        assert labels <= own | allowed_everywhere, f"{name}: labels {labels - own} are not in the contract"
        available |= own
    if available:
        assert clause_labels <= available | allowed_everywhere, f"{clause_labels - available} in {expr!r}"


# --- the committed rendering -----------------------------------------------------------------------


def test_committed_dashboard_is_the_rendering() -> None:
    committed = REPO_ROOT / "docs" / "dashboards" / "llm-telemetry.json"
    assert committed.read_text() == render_dashboard_json(), "regenerate with: llm-telemetry dashboard"
    assert json.loads(committed.read_text())["uid"] == "llm-telemetry"


# --- structure -------------------------------------------------------------------------------------


def test_dashboard_has_a_current_schema_and_the_rows_in_order() -> None:
    dashboard = build_dashboard(title="Chat", uid="chat-llm")
    assert 39 <= dashboard["schemaVersion"] <= 41
    assert (dashboard["title"], dashboard["uid"]) == ("Chat", "chat-llm")
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS


def test_rows_hold_the_panels_the_issue_asks_for() -> None:
    rows: dict[str, list[str]] = {}
    current = ""
    for panel in build_dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        else:
            rows.setdefault(current, []).append(panel["title"])
    assert rows["Health"] == [
        "Requests/s",
        "Error ratio",
        "p95 request duration",
        "p95 time to first token",
        "Active requests",
    ]
    assert {"Request duration by model", "Time to first token by model", "Time per output token by model"} <= set(
        rows["Latency"]
    )
    assert {
        "Tokens/min by model and type",
        "Cost per hour by model",
        "Cost per request by model",
        "Cache-hit share of input tokens",
        "Cache and reasoning tokens/min by model",
        "Estimated vs reported tokens",
    } <= set(rows["Tokens and cost"])
    assert {
        "Errors/s by error type",
        "Error ratio by model",
        "Responses/s by finish reason",
        "Truncated response ratio by model",
        "Error log lines",
    } <= set(rows["Errors and finish reasons"])
    assert rows["Tools"] == ["Tool calls/s by tool", "Tool failure ratio by tool"]
    assert rows["Attribution"] == ["Top tenant by tokens", "Top tenant by cost"]


def test_every_panel_has_unit_legend_and_description() -> None:
    for panel in _panels(build_dashboard()):
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["legendFormat"], panel["title"]


def test_panels_tile_the_grid_without_overlap() -> None:
    dashboard = build_dashboard(attribution_labels=("tenant", "team"))
    taken: set[tuple[int, int]] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_variables_are_multi_with_all_and_cover_attribution_labels() -> None:
    dashboard = build_dashboard(attribution_labels=("tenant", "team"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == [
        "datasource", "namespace", "job", "endpoint", "service", "log_services", "model", "llm_metadata_tenant",
        "llm_metadata_team",
    ]  # fmt: skip
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # The trace service: one value (Jaeger searches one service), from the resource the SDK exports.
    service = variables["service"]
    assert not service["multi"] and not service["includeAll"]
    assert service["definition"] == (
        'label_values(target_info{namespace=~"$namespace",job=~"$job",endpoint=~"$endpoint"}, service_name)'
    )
    for name in ["namespace", "job", "endpoint", "model", "llm_metadata_tenant", "llm_metadata_team"]:
        variable = variables[name]
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*", name
        assert variable["datasource"]["uid"] == "${datasource}"
    assert variables["model"]["definition"].endswith("gen_ai_request_model)")
    assert variables["llm_metadata_team"]["definition"].endswith("llm_metadata_team)")


def test_the_dashboard_opens_on_all_or_on_the_service_named() -> None:
    def currents(**scope: str) -> dict[str, list[str]]:
        return {v["name"]: v["current"].get("value") for v in build_dashboard(**scope)["templating"]["list"]}

    everything = currents()
    assert everything["namespace"] == everything["job"] == everything["model"] == ["$__all"]
    assert everything["endpoint"] == ["$__all"]
    one = currents(namespace="llm", job="chat", endpoint="llm-metrics")
    assert (one["namespace"], one["job"], one["endpoint"]) == (["llm"], ["chat"], ["llm-metrics"])
    scope = ("namespace", "job", "endpoint")
    assert {k: v for k, v in one.items() if k not in scope} == {k: v for k, v in everything.items() if k not in scope}


def test_every_query_filters_by_the_variables_that_apply() -> None:
    dashboard = build_dashboard(attribution_labels=("tenant",))
    for expr in _prometheus_exprs(dashboard):
        metrics, _ = references(expr)
        for name, labels in metrics.items():
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            spec = METRICS[base]
            # The scrape endpoint too: a job scraped on two ports that both export the metrics counts twice.
            assert {"namespace", "job", "endpoint"} <= labels, expr
            assert ("gen_ai_request_model" in labels) == ("gen_ai_request_model" in spec.labels), expr
            assert ("llm_metadata_tenant" in labels) == spec.attributed, expr


def test_attribution_panels_follow_the_labels() -> None:
    titles = [p["title"] for p in build_dashboard(attribution_labels=("tenant", "team"))["panels"]]
    assert titles[-4:] == ["Top tenant by tokens", "Top tenant by cost", "Top team by tokens", "Top team by cost"]
    none = build_dashboard(attribution_labels=())
    assert "Attribution" not in [p["title"] for p in none["panels"]]
    assert [v["name"] for v in none["templating"]["list"]] == [
        "datasource", "namespace", "job", "endpoint", "service", "log_services", "model"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="attribution label"):
        build_dashboard(attribution_labels=("x-tenant-id",))


def test_latency_panels_show_exemplars_and_link_to_jaeger() -> None:
    panels = {p["title"]: p for p in _panels(build_dashboard(jaeger_uid="traces"))}
    for title in [
        "Request duration by model",
        "Time to first token by model",
        "Time per output token by model",
        "Request duration distribution",
        "Time to first token distribution",
    ]:
        assert all(t.get("exemplar") is True for t in panels[title]["targets"]), title
    link = panels["Request duration by model"]["fieldConfig"]["defaults"]["links"][0]
    url = urllib.parse.unquote(link["url"])
    pane = json.loads(url.split("panes=", 1)[1])["a"]
    assert pane["datasource"] == "traces" and pane["queries"][0]["datasource"] == {"type": "jaeger", "uid": "traces"}
    assert pane["queries"][0]["service"] == "${service}"
    assert pane["queries"][0]["tags"] == "gen_ai.request.model=${__field.labels.gen_ai_request_model}"
    assert "${service}" in link["url"]  # left for Grafana to interpolate


def test_links_name_only_labels_the_series_carry_and_variables_that_exist() -> None:
    """A data link's ``${__field.labels.x}`` is empty unless the clicked series has label x: after ``sum by
    (...)``, only the labels it keeps (``histogram_quantile`` drops ``le``)."""
    dashboard = build_dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]} | {"__from", "__to"}
    linked = [p for p in _panels(dashboard) if p["fieldConfig"]["defaults"].get("links")]
    assert len(linked) == 3
    for panel in linked:
        kept = set.intersection(
            *({x.strip() for x in re.search(r"by \(([^)]*)\)", t["expr"]).group(1).split(",")} - {"le"}
              for t in panel["targets"])
        )  # fmt: skip
        for link in panel["fieldConfig"]["defaults"]["links"]:
            url = urllib.parse.unquote(link["url"])
            assert set(re.findall(r"\$\{__field\.labels\.(\w+)\}", url)) <= kept, (panel["title"], kept)
            named = set(re.findall(r"\$\{(\w+)\}", url)) | set(re.findall(r"\$(\w+)", url))
            assert named <= variables, named - variables


def test_error_logs_panel_queries_loki() -> None:
    panel = next(p for p in _panels(build_dashboard(loki_uid="logs")) if p["type"] == "logs")
    assert panel["datasource"] == {"type": "loki", "uid": "logs"}
    assert panel["targets"][0]["datasource"] == {"type": "loki", "uid": "logs"}
    with pytest.raises(ValueError, match="logs_mode"):
        build_dashboard(logs_mode="loki")


#: The stream label each way of shipping the lines gives a pod's namespace. Loki's OTLP endpoint makes some
#: resource attributes stream labels by default, k8s.namespace.name among them, their dots turned to underscores;
#: log agents (Promtail, Grafana Alloy) label a pod's streams `namespace`.
NAMESPACE_LABEL = {"otlp": "k8s_namespace_name", "stdout": "namespace"}


@pytest.mark.parametrize("mode", ["otlp", "stdout"])
def test_error_logs_query_is_one_loki_accepts_and_reads_the_lines_fields(mode: str) -> None:
    """Loki refuses a selector whose every matcher matches the empty string, as ``namespace=~".*"`` does with
    the namespace variable at All (the dashboard's default view); with its filters on the request-log fields.
    A real Loki runs the query in tests/test_loki.py, when one is installed."""
    from llm_telemetry.logs import FIELDS
    from logql import interpolate, loki_refuses, selector

    dashboard = build_dashboard(logs_mode=mode)
    (panel,) = [p for p in _panels(dashboard) if p["type"] == "logs"]
    expr = panel["targets"][0]["expr"]
    services = {"log_services": ["chat", "search"]}  # what the variable's query finds
    for chosen in ({}, {"namespace": ["llm"]}, {"namespace": ["llm", "search"], "model": ["gpt-4o"]}):
        query = interpolate(expr, dashboard, chosen, services)
        assert not loki_refuses(query), (chosen, query)
        assert ('service_name=~"(chat|search)"' if mode == "otlp" else '| service =~ "(chat|search)"') in query
    assert {label for label, _, _ in selector(expr)} == {NAMESPACE_LABEL[mode]} | (
        {"service_name"} if mode == "otlp" else set()
    )
    assert (" | json " in expr) == (mode == "stdout")  # OTLP records carry the fields as structured metadata
    filters = re.findall(r"\|\s*([a-z_]+)\s*(?:!=|=~|=|!~|>|<)", expr)
    assert filters and set(filters) <= set(FIELDS), filters


def test_the_error_log_panel_keeps_the_lines_of_the_dashboards_services() -> None:
    """Two LLMTelemetry resources in one namespace each get a dashboard; by namespace alone, the error log panel of
    one listed the other's failures too. It keeps the lines of the services of the jobs the dashboard is scoped to
    (the OpenTelemetry service names their metrics carry in target_info), every one of them."""
    dashboard = build_dashboard(namespace="llm", job="chat", endpoint="llm-metrics")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    scope = 'namespace=~"$namespace",job=~"$job",endpoint=~"$endpoint"'
    services = variables["log_services"]
    assert services["definition"] == f"label_values(target_info{{{scope}}}, service_name)"
    assert services["multi"] and services["includeAll"] and services.get("allValue") is None
    assert services["hide"] == 2 and services["current"]["value"] == ["$__all"]
    # The request-log line names its service as target_info does (both are the resource's service.name).
    from llm_telemetry.logs import FIELDS

    assert "service" in FIELDS


def test_stat_panels_show_the_latest_value_and_say_when_there_is_no_traffic() -> None:
    """An error ratio or a quantile of no requests is NaN. Reduced with "lastNotNull", Grafana skipped it and kept
    showing the value from before the traffic stopped (a red 24% error ratio on an idle service, for as long as the
    time range held it); the latest value is shown, and NaN reads "no traffic"."""
    stats = [p for p in _panels(build_dashboard()) if p["type"] == "stat"]
    assert len(stats) == 5
    for panel in stats:
        assert panel["options"]["reduceOptions"]["calcs"] == ["last"], panel["title"]
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        assert mapping["options"] == {"match": "null+nan", "result": {"text": "no traffic"}}, panel["title"]


def test_units_read_as_grafana_formats_them() -> None:
    """Grafana's value formatter (``getValueFormat`` of @grafana/data 11) writes ``suffix:<text>`` as the value, a
    space, then <text> as given: ``suffix: tok/min`` showed "1036  tok/min". And a stat's ``decimals`` are kept
    for whole numbers: the count of requests in flight showed "3.00"."""
    panels = _panels(build_dashboard())
    custom = [p["fieldConfig"]["defaults"]["unit"] for p in panels if p["fieldConfig"]["defaults"]["unit"].count(":")]
    assert custom and all(re.fullmatch(r"suffix:\S.*", unit) for unit in custom), custom
    (active,) = [p for p in panels if p["title"] == "Active requests"]
    assert active["fieldConfig"]["defaults"]["decimals"] == 0


def test_heatmaps_read_buckets_as_heatmap_frames() -> None:
    """Each cell is a rate of requests, labelled as one: Grafana gives the cells the buckets' unit (seconds) unless
    the panel names theirs, and showed 0.4 req/s as "400 ms"."""
    for panel in _panels(build_dashboard()):
        if panel["type"] == "heatmap":
            assert panel["targets"][0]["format"] == "heatmap"
            assert panel["targets"][0]["expr"].startswith("sum by (le) (rate(")
            assert panel["options"]["yAxis"]["unit"] == "s" and panel["options"]["cellValues"]["unit"] == "reqps"


# --- PromQL ----------------------------------------------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool 2.42 has no "promql parse"; "check rules" parses every expression of a rule file.
    exprs = _prometheus_exprs(build_dashboard(attribution_labels=("tenant", "team")))
    exprs += [
        v["definition"].replace("label_values(", "group by (x) (").rsplit(",", 1)[0] + ")"
        for v in build_dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]
    rules = [{"record": f"dashboard:query_{i}", "expr": _dashboard_expr_as_promql(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_the_overflow_series_has_a_name_in_by_label_panels(tmp_path: Path) -> None:
    """Past the series limit, a metric's new label sets go to series labelled otel_metric_overflow="true", with
    no model, tool name or attribution label (the labels with few values, such as the token type, kept). Grouped
    by model, Grafana would show one with a blank legend, or the whole query as its name when no label is left: the
    panels name it. The attribution panels tell it from a series recorded with no attribution at all (the
    middleware's attribution not set up), which is not an overflow. Evaluated by Prometheus's engine (promtool's
    rule unit tests) beside a model's series, which keeps its name."""
    targets = {p["title"]: p["targets"] for p in _panels(build_dashboard()) if p["datasource"]["type"] == "prometheus"}
    scrape = 'namespace="llm",job="chat",endpoint="llm-metrics"'
    named, overflow = f'{scrape},gen_ai_request_model="gpt-4o"', f'{scrape},otel_metric_overflow="true"'
    input_type = 'gen_ai_token_type="input"'
    series = [
        # a dollar a second for the model, two in the overflow series
        {"series": f"llm_cost_usd_total{{{named}}}", "values": "0+60x10"},
        {"series": f"llm_cost_usd_total{{{overflow}}}", "values": "0+120x10"},
        {"series": f'llm_tokens_total{{{named},{input_type},llm_metadata_tenant="acme"}}', "values": "0+60x10"},
        {"series": f"llm_tokens_total{{{overflow},{input_type}}}", "values": "0+30x10"},
        # a process whose middleware records no tenant
        {"series": f'llm_tokens_total{{{scrape},gen_ai_request_model="llama",{input_type}}}', "values": "0+10x10"},
    ]
    for labels in (named, overflow):  # every request took under half a second
        series += [
            {"series": f'gen_ai_server_time_to_first_token_seconds_bucket{{{labels},le="{le}"}}', "values": "0+60x10"}
            for le in ("0.5", "+Inf")
        ]
    cases = [
        ("Cost per hour by model", "A", {"gpt-4o": 3600, OVERFLOW: 7200}, ["gen_ai_request_model"]),
        ("Tokens/min by model and type", "A", {"gpt-4o input": 60, "llama input": 10, f"{OVERFLOW} input": 30},
         ["gen_ai_request_model", "gen_ai_token_type"]),
        ("Time to first token by model", "A", {"gpt-4o": 0.25, OVERFLOW: 0.25}, ["gen_ai_request_model"]),
    ]  # fmt: skip
    tests = []
    for title, ref, expected, labels in cases:
        (target,) = [t for t in targets[title] if t["refId"] == ref]
        samples = [
            {
                "labels": "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, key.split(" "), strict=True)) + "}",
                "value": value,
            }
            for key, value in expected.items()
        ]
        tests.append({"expr": _dashboard_expr_as_promql(target["expr"]), "eval_time": "10m", "exp_samples": samples})
    (target,) = targets["Top tenant by tokens"]
    tenants = [
        ('{llm_metadata_tenant="acme"}', 600),
        ('{llm_metadata_tenant="(overflow)",otel_metric_overflow="true"}', 300),
        ('{llm_metadata_tenant="(not attributed)"}', 100),
    ]
    tests.append(
        {
            "expr": _dashboard_expr_as_promql(target["expr"]),
            "eval_time": "10m",
            "exp_samples": [{"labels": labels, "value": value} for labels, value in tenants],
        }
    )
    path = tmp_path / "overflow.yaml"
    path.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_only_use_contract_metrics_and_labels() -> None:
    groups = build_rule_groups(AlertThresholds(cost_per_hour_usd=1), selector='namespace="llm",job="chat"')
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    assert exprs
    for expr in exprs:
        _check_contract(expr, set(), recorded)
    for expr in _prometheus_exprs(build_dashboard(attribution_labels=("tenant", "team"))):
        _check_contract(expr, {"llm_metadata_tenant", "llm_metadata_team"}, set())


def test_contract_check_catches_unknown_names() -> None:
    with pytest.raises(AssertionError, match="not an exported metric"):
        _check_contract("rate(llm_request_total[5m])", set(), set())
    with pytest.raises(AssertionError, match="not in the contract"):
        _check_contract('rate(llm_tool_results_total{gen_ai_request_model="x"}[5m])', set(), set())
    with pytest.raises(AssertionError):
        _check_contract("sum by (gen_ai_tool_name) (rate(llm_tokens_total[5m]))", set(), set())


# --- token sums ---------------------------------------------------------------------------------------

TOKENS = instruments.TOKENS.prometheus_name
DETAILS = instruments.TOKEN_DETAILS.prometheus_name
DETAIL_LABEL = instruments.label(instruments.LLM_TOKEN_DETAIL)
TYPE_LABEL = instruments.label(instruments.GEN_AI_TOKEN_TYPE)
(OVERFLOW_LABEL,) = (instruments.label(key) for key in instruments.OVERFLOW_ATTRIBUTES)


#: What an expression's series count, for the token checks: billable tokens (``llm_tokens_total``: input and
#: output, sum-safe); token details (``llm_token_details_total``: parts of those) with several details apart by
#: label; or one detail alone.
BILLABLE, DETAILS_APART, ONE_DETAIL = "billable tokens", "token details", "one token detail"
#: Aggregations that add their series' values together.
ADDING_AGGREGATIONS = {"sum", "avg"}


def check_token_sums(expr: str) -> None:
    """Fail if ``expr`` can add overlapping token counts.

    The expression is parsed (Grafana's variables substituted first) and walked as PromQL evaluates it.
    ``llm_tokens_total`` (and its recording rules) holds billable tokens only, so any aggregation of it is fine,
    as long as it asks for no token type that is not billable. ``llm_token_details_total`` (and its recording
    rules) holds parts of those (cache reads and writes of input, reasoning of output): an adding aggregation of
    it must keep ``llm_token_detail`` apart, and nothing may add it to billable tokens (``+``, or an adding
    aggregation over both).
    """
    import promql_parser

    def parts(node: Any) -> set[str]:
        if isinstance(node, promql_parser.VectorSelector):
            return selector(node)
        if isinstance(node, promql_parser.MatrixSelector):
            return selector(node.vector_selector)
        if isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            return parts(node.expr)
        if isinstance(node, promql_parser.Call):
            return set().union(*(parts(arg) for arg in node.args))
        if isinstance(node, promql_parser.AggregateExpr):
            inner = parts(node.expr)
            if str(node.op) in ADDING_AGGREGATIONS:
                assert not (BILLABLE in inner and inner - {BILLABLE}), (
                    f"{expr!r}: {node.op} adds details to billable tokens"
                )
                if DETAILS_APART in inner:
                    modifier = node.modifier
                    if modifier is None:
                        kept = False
                    elif modifier.type == promql_parser.AggModifierType.By:
                        kept = DETAIL_LABEL in modifier.labels
                    else:
                        kept = DETAIL_LABEL not in modifier.labels
                    assert kept, f"{expr!r}: {node.op} adds {DETAILS} across {DETAIL_LABEL} (parts of input and output)"
            return inner
        if isinstance(node, promql_parser.BinaryExpr):
            lhs, rhs = parts(node.lhs), parts(node.rhs)
            if str(node.op) == "+":
                for one, other in ((lhs, rhs), (rhs, lhs)):
                    assert not (BILLABLE in one and other - {BILLABLE}), (
                        f"{expr!r}: adds token details to billable tokens"
                    )
            return lhs | rhs
        return set()  # numbers and strings

    def selector(node: Any) -> set[str]:
        name = node.name or ""
        matchers = list(node.matchers.matchers) if node.matchers is not None else []
        if any(m.name == OVERFLOW_LABEL and m.op == promql_parser.MatchOp.Equal and m.value for m in matchers):
            return set()  # one overflow series per target, its other labels empty: nothing apart to add up
        for m in matchers:
            if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
                name = m.value
        if name == TOKENS or name.startswith("llm:llm_tokens:"):
            for m in matchers:
                if m.name == TYPE_LABEL and m.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re):
                    asked = set(m.value.split("|"))
                    assert asked <= set(instruments.TOKEN_TYPES), f"{expr!r}: {m.value} is not a billable type"
            return {BILLABLE}
        if name == DETAILS or name.startswith("llm:llm_token_details:"):
            one = any(m.name == DETAIL_LABEL and m.op == promql_parser.MatchOp.Equal and m.value for m in matchers)
            return {ONE_DETAIL} if one else {DETAILS_APART}
        return set()

    parts(promql_parser.parse(_dashboard_expr_as_promql(expr)))


def _shipped_queries() -> list[str]:
    exprs = _prometheus_exprs(build_dashboard(attribution_labels=("tenant", "team")))
    for kwargs in ({}, {"selector": 'namespace="llm",job="chat"'}):
        groups = build_rule_groups(AlertThresholds(cost_per_hour_usd=1), **kwargs)  # type: ignore[arg-type]
        exprs += [r["expr"] for g in groups for r in g["rules"]]
    return exprs


def test_no_shipped_query_double_counts_tokens() -> None:
    exprs = _shipped_queries()
    assert any(TOKENS in e for e in exprs) and any(DETAILS in e for e in exprs)
    for expr in exprs:
        check_token_sums(expr)


@pytest.mark.parametrize(
    "expr",
    [
        f"sum(rate({DETAILS}[5m]))",
        f"sum by (gen_ai_request_model) (rate({DETAILS}[5m]))",
        f'sum by ({DETAIL_LABEL}) (rate({DETAILS}[5m])) + sum(rate({TOKENS}{{{TYPE_LABEL}="input"}}[5m]))',
        f'sum(rate({TOKENS}{{{TYPE_LABEL}=~"input|cache_read"}}[5m]))',
        "sum by (job) (llm:llm_token_details:rate5m)",
        f'sum without ({DETAIL_LABEL}) (rate({DETAILS}{{{DETAIL_LABEL}=~"cache_read|reasoning"}}[5m]))',
        # the pinned detail is part of the billable tokens it is added to
        f'sum(rate({TOKENS}[5m])) + sum(rate({DETAILS}{{{DETAIL_LABEL}="cache_read"}}[5m]))',
        f'sum(rate({TOKENS}[5m]) or rate({DETAILS}{{{DETAIL_LABEL}="reasoning"}}[5m]))',
        # however the addition is dressed up
        f"(sum by (m, t) (rate({TOKENS}[$__rate_interval])) + on (m, t) sum by (m, t) "
        f'(rate({DETAILS}{{{DETAIL_LABEL}="cache_read"}}[$__rate_interval]))) * 60',
        f"sum by (m) (rate({TOKENS}[5m])) * 60 + sum by (m, {DETAIL_LABEL}) (rate({DETAILS}[5m]))",
        f"sum(llm:llm_tokens:rate5m) + sum by ({DETAIL_LABEL}) (llm:llm_token_details:rate5m)",
        f"sum by (job) (llm:llm_tokens:rate5m) > 3 * (llm:llm_tokens:rate1h offset 15m + on (job) "
        f'sum by (job) (rate({DETAILS}{{{DETAIL_LABEL}="cache_creation"}}[5m])))',
    ],
)
def test_token_sum_check_catches_double_counting(expr: str) -> None:
    with pytest.raises(AssertionError):
        check_token_sums(expr)


def test_no_promql_example_in_the_docs_double_counts_tokens() -> None:
    blocks = []
    for path in sorted((REPO_ROOT / "docs").glob("*.md")):
        blocks += re.findall(r"```promql\n(.*?)```", path.read_text(), flags=re.S)
    assert any(TOKENS in b for b in blocks)
    for block in blocks:
        for expr in block.strip().split("\n\n"):
            check_token_sums(expr)


def test_docs_panel_tables_name_every_panel_and_no_other() -> None:
    """docs/dashboards.md has a table row per panel of the default dashboard (one attribution label, tenant)."""
    rows: list[str] = []
    header = False
    for line in (REPO_ROOT / "docs" / "dashboards.md").read_text().splitlines():
        if line.startswith("| Panel |"):
            header = True
        elif header and line.startswith("|") and not line.startswith("|---"):
            rows.append(line.split("|")[1].strip())
        elif not line.startswith("|"):
            header = False
    titles = [p["title"] for p in _panels(build_dashboard())]
    assert sorted(rows) == sorted(titles)
