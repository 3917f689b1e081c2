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
from llm_telemetry.monitoring.dashboards import build_dashboard, render_dashboard_json
from llm_telemetry.monitoring.rules import METRICS, SCRAPE_LABELS, AlertThresholds, build_rule_groups

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")

ROWS = ["Health", "Latency", "Tokens and cost", "Errors", "Tools", "Attribution"]
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
    allowed_everywhere = {*SCRAPE_LABELS, "le"}
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
    assert {"Errors/s by error type", "Error ratio by model", "Error log lines"} <= set(rows["Errors"])
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
    assert list(variables) == ["datasource", "namespace", "job", "model", "llm_metadata_tenant", "llm_metadata_team"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ["namespace", "job", "model", "llm_metadata_tenant", "llm_metadata_team"]:
        variable = variables[name]
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*", name
        assert variable["datasource"]["uid"] == "${datasource}"
    assert variables["model"]["definition"].endswith("gen_ai_request_model)")
    assert variables["llm_metadata_team"]["definition"].endswith("llm_metadata_team)")


def test_every_query_filters_by_the_variables_that_apply() -> None:
    dashboard = build_dashboard(attribution_labels=("tenant",))
    for expr in _prometheus_exprs(dashboard):
        metrics, _ = references(expr)
        for name, labels in metrics.items():
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            spec = METRICS[base]
            assert {"namespace", "job"} <= labels, expr
            assert ("gen_ai_request_model" in labels) == ("gen_ai_request_model" in spec.labels), expr
            assert ("llm_metadata_tenant" in labels) == spec.attributed, expr


def test_attribution_panels_follow_the_labels() -> None:
    titles = [p["title"] for p in build_dashboard(attribution_labels=("tenant", "team"))["panels"]]
    assert titles[-4:] == ["Top tenant by tokens", "Top tenant by cost", "Top team by tokens", "Top team by cost"]
    none = build_dashboard(attribution_labels=())
    assert "Attribution" not in [p["title"] for p in none["panels"]]
    assert [v["name"] for v in none["templating"]["list"]] == ["datasource", "namespace", "job", "model"]
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
    assert pane["queries"][0]["service"] == "${__field.labels.job}"
    assert "${__field.labels.gen_ai_request_model}" in pane["queries"][0]["tags"]
    assert "${__field.labels.job}" in link["url"]  # left for Grafana to interpolate


def test_error_logs_panel_queries_loki() -> None:
    panel = next(p for p in _panels(build_dashboard(loki_uid="logs")) if p["type"] == "logs")
    assert panel["datasource"] == {"type": "loki", "uid": "logs"}
    assert panel["targets"][0]["expr"].startswith('{namespace=~"$namespace"} | json | error_type != ""')


def test_heatmaps_read_buckets_as_heatmap_frames() -> None:
    for panel in _panels(build_dashboard()):
        if panel["type"] == "heatmap":
            assert panel["targets"][0]["format"] == "heatmap"
            assert panel["targets"][0]["expr"].startswith("sum by (le) (rate(")


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


def check_token_sums(expr: str) -> None:
    """Fail if ``expr`` can add overlapping token counts.

    ``llm_tokens_total`` is sum-safe (billable input and output), so any aggregation of it is fine as long as
    it does not ask for a token type that is not billable. ``llm_token_details_total`` holds parts of those
    (cache reads and writes of input, reasoning of output): it may only be aggregated per detail, either by
    pinning one ``llm_token_detail`` or by keeping that label, and never added to the billable counter.
    """
    for matchers in re.findall(rf"{TOKENS}\s*\{{([^}}]*)\}}", expr):
        for value in re.findall(rf'{TYPE_LABEL}\s*=~?\s*"([^"]*)"', matchers):
            assert set(value.split("|")) <= set(instruments.TOKEN_TYPES), f"{expr!r}: {value} is not a billable type"
    for recorded in re.findall(r"llm:llm_token_details:\w+", expr):
        raise AssertionError(f"{expr!r}: aggregates the recorded details {recorded} again")
    uses_details = False
    for match in re.finditer(rf"{DETAILS}\s*(\{{[^}}]*\}})?", expr):
        uses_details = True
        if re.search(rf'{DETAIL_LABEL}\s*=\s*"[^"|]+"', match.group(1) or ""):
            continue  # one detail: nothing overlaps
        # The aggregation wrapping this selector is the last one opened before it.
        before = expr[: match.start()]
        aggregations = list(re.finditer(r"\b(sum|avg|min|max|count|topk|bottomk)\s*(by\s*\(([^)]*)\))?\s*\(", before))
        assert aggregations, f"{expr!r}: {DETAILS} is used unaggregated without a single {DETAIL_LABEL}"
        kept = {label.strip() for label in (aggregations[-1].group(3) or "").split(",")}
        assert DETAIL_LABEL in kept, f"{expr!r}: sums {DETAILS} across {DETAIL_LABEL}, adding overlapping parts"
    if uses_details and TOKENS in expr:
        assert not re.search(r"\)\s*[+-]\s*(sum|rate|increase)", expr), f"{expr!r}: adds details to billable tokens"


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
        f'rate({DETAILS}{{{DETAIL_LABEL}=~"cache_read|reasoning"}}[5m])',
        "sum by (job) (llm:llm_token_details:rate5m)",
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
