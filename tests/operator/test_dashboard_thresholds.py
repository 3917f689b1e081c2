"""The operator's dashboard turns red where its resource's alerts fire.

The Health row's *Error ratio*, *p95 request duration* and *p95 time to first token* panels colour their value by
thresholds. They were fixed at the alerts' defaults (5%, 81.92 s, 2.5 s) whatever ``spec.alerts`` set, so a
resource alerting at a 2% error ratio showed 3% failing in orange with its alert firing, and one whose p95 TTFT
objective was 5 s showed a red 4.9 s with its alert quiet. Here Prometheus's engine (promtool's rule unit tests)
evaluates the resource's PrometheusRule and each panel's query, as the dashboard opens, over traffic just past and
just under each threshold: the panel reaches its red step exactly when the alert fires.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_telemetry import instruments
from llm_telemetry.monitoring.rules import le_value
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")

NAMESPACE, NAME = "llm-ns", "chat"
OWNER = {"metadata": {"namespace": NAMESPACE, "name": NAME, "uid": "u"}}
SCRAPE = f'namespace="{NAMESPACE}",job="{NAME}",endpoint="llm-metrics",gen_ai_request_model="m1"'
#: Per panel: its alert, and the histogram whose buckets it reads (None: the error ratio).
PANELS = {
    "Error ratio": ("LLMHighErrorRatio", None),
    "p95 request duration": ("LLMHighRequestDuration", instruments.REQUEST_DURATION),
    "p95 time to first token": ("LLMHighTimeToFirstToken", instruments.TIME_TO_FIRST_TOKEN),
}


def _as_opened(expr: str) -> str:
    """The panel's query as the operator's dashboard opens: on its own namespace, job and endpoint, every other
    variable on All, over the alerts' 5 minutes."""
    expr = expr.replace("$__rate_interval", "5m")
    for name, value in (("namespace", NAMESPACE), ("job", NAME), ("endpoint", "llm-metrics")):
        expr = expr.replace(f"${name}", value)
    assert "$model" in expr and "$llm_metadata_tenant" in expr
    return expr.replace("$model", ".*").replace("$llm_metadata_tenant", ".*")


def _traffic(title: str, red: float, past: bool) -> list[dict[str, str]]:
    """A minute's worth of counts, repeated for 30 minutes: its value just past ``red`` or just under it."""
    if PANELS[title][1] is None:
        errors = round(1000 * red * (1.5 if past else 0.5))
        return [
            {"series": f'llm_requests_total{{{SCRAPE},error_type=""}}', "values": f"0+{1000 - errors}x30"},
            {"series": f'llm_requests_total{{{SCRAPE},error_type="server_error"}}', "values": f"0+{errors}x30"},
            {"series": f'llm_errors_total{{{SCRAPE},error_type="server_error"}}', "values": f"0+{errors}x30"},
        ]
    spec = PANELS[title][1]
    assert spec is not None
    bounds = list(spec.buckets)
    at = bounds.index(red)
    # Past: a tenth of the requests in the bucket above red, so the p95 lies in it. Under: every request in the
    # bucket that red closes, so the p95 is an interpolation below red.
    counts = {bounds[at - 1]: 0, red: 90 if past else 100, bounds[at + 1]: 100}
    return [
        {"series": f'{spec.prometheus_name}_bucket{{{SCRAPE},le="{le_value(le)}"}}', "values": f"0+{n}x30"}
        for le, n in [*counts.items(), (float("inf"), 100)]
    ]


@pytest.mark.parametrize(
    "alerts",
    [{}, {"errorRatio": 0.02, "p95RequestDurationSeconds": 20, "p95TtftSeconds": 5}],
    ids=["defaults", "set"],
)
def test_health_panels_turn_red_where_the_alerts_fire(tmp_path: Path, alerts: dict[str, Any]) -> None:
    spec = parse_spec({"selector": {"matchLabels": {"app": NAME}}, "alerts": alerts})
    config = OperatorConfig()
    rule = r.build_prometheus_rule(OWNER, spec, config)
    (text,) = r.build_dashboard_configmap(OWNER, spec, config)["data"].values()
    panels = {p["title"]: p for p in json.loads(text)["panels"] if p["title"] in PANELS}
    assert set(panels) == set(PANELS)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    tests = []
    for title, panel in panels.items():
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["color"] for s in steps][-1] == "red", steps
        red = steps[-1]["value"]
        (target,) = panel["targets"]
        alert = PANELS[title][0]
        for past in (True, False):
            tests.append(
                {
                    "name": f"{title} {'past' if past else 'under'} {red}",
                    "interval": "1m",
                    "input_series": _traffic(title, red, past),
                    "promql_expr_test": [
                        # The panel's value reaches its red step...
                        {
                            "expr": f"({_as_opened(target['expr'])}) >= bool {red}",
                            "eval_time": "25m",
                            "exp_samples": [{"labels": "{}", "value": int(past)}],
                        },
                        # ...exactly when the resource's alert fires.
                        {
                            "expr": f'count(ALERTS{{alertname="{alert}",alertstate="firing"}}) or vector(0)',
                            "eval_time": "25m",
                            "exp_samples": [{"labels": "{}", "value": int(past)}],
                        },
                    ],
                }
            )
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
